"""Structured (channel) pruning of ResNets and compaction into a physically smaller model.

A unit is an inner channel of a residual block (`layer1_0/conv1`, and `conv2` in bottlenecks):
removing it never breaks a residual sum. Channel masks are `{unit: bool[C]}`. As parameter masks
they zero the unit's conv filter and its BatchNorm scale and bias, so the unit outputs exactly 0
after BN and ReLU; `compact` slices the conv, the BN parameters and statistics, and the next
conv's input channels, giving a `ResNet` with smaller `inner_widths` whose outputs equal the
masked dense model's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models.resnet import ResNet

_BLOCK = re.compile(r"layer\d+_\d+$")


@dataclasses.dataclass(frozen=True)
class Unit:
    block: str
    conv: str  # the conv producing the unit's channels
    bn: str
    next: str  # the conv consuming them
    width: int

    @property
    def name(self) -> str:
        return f"{self.block}/{self.conv}"


def resnet_units(params) -> list[Unit]:
    """Prunable units of a ResNet's params, in block order."""
    units = []
    blocks = sorted((k for k in params if _BLOCK.match(k)),
                    key=lambda k: tuple(int(x) for x in re.findall(r"\d+", k)))
    for b in blocks:
        convs = ["conv1", "conv2"] + (["conv3"] if "conv3" in params[b] else [])
        for i, c in enumerate(convs[:-1]):
            width = params[b][c]["kernel"].shape[-1]
            units.append(Unit(b, c, f"bn{i + 1}", convs[i + 1], width))
    if not units:
        raise ValueError("no residual blocks (layerX_Y) in these params: not a jaxmed ResNet")
    return units


def filter_l1_scores(params) -> dict[str, jax.Array]:
    """L1 norm of each unit's filter (Li et al. 2017)."""
    return {u.name: jnp.sum(jnp.abs(params[u.block][u.conv]["kernel"]), axis=(0, 1, 2))
            for u in resnet_units(params)}


def channel_masks(scores: dict[str, Any], fraction: float, *, scope: str = "global",
                  prune: str = "lowest", min_keep: int = 1) -> dict[str, np.ndarray]:
    """Remove `fraction` of the channels: the lowest-scoring ones (or the highest, for scores
    where high means harmful, like BiasPruner's bias score), ranked across all units
    ('global') or within each ('layer'). Every unit keeps at least `min_keep` channels (its
    best-scoring ones), so no layer is ever emptied."""
    names = list(scores)
    vals = {k: np.asarray(v, np.float64) * (1.0 if prune == "lowest" else -1.0)
            for k, v in scores.items()}
    if prune not in ("lowest", "highest"):
        raise ValueError(f"prune must be 'lowest' or 'highest', got {prune!r}")
    keep = {}
    if scope == "global":
        flat = np.concatenate([vals[k] for k in names])
        k = int(round(fraction * flat.size))
        order = np.argsort(flat, kind="stable")
        pruned = np.zeros(flat.size, bool)
        pruned[order[:k]] = True
        start = 0
        for n in names:
            keep[n] = ~pruned[start:start + vals[n].size]
            start += vals[n].size
    elif scope == "layer":
        for n in names:
            order = np.argsort(vals[n], kind="stable")
            m = np.ones(vals[n].size, bool)
            m[order[:int(round(fraction * vals[n].size))]] = False
            keep[n] = m
    else:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    for n in names:
        if keep[n].sum() < min_keep:
            best = np.argsort(-vals[n], kind="stable")[:min_keep]
            keep[n][best] = True
    return keep


def param_masks(params, masks: dict[str, Any]):
    """Channel masks -> a parameter mask pytree (leaves broadcast against their weights)."""
    units = {u.name: u for u in resnet_units(params)}
    flat: dict[tuple, Any] = {}
    for name, m in masks.items():
        if name not in units:
            raise KeyError(f"{name!r} is not a prunable unit; units: {sorted(units)[:6]}...")
        u = units[name]
        m = jnp.asarray(m, bool)
        flat[(u.block, u.conv, "kernel")] = m
        flat[(u.block, u.bn, "scale")] = m
        flat[(u.block, u.bn, "bias")] = m
    full = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return flax.traverse_util.unflatten_dict({k: flat.get(k) for k in full})


def compact(model: ResNet, variables: dict, masks: dict[str, Any]) -> tuple[ResNet, dict]:
    """A smaller ResNet (per-block `inner_widths`) and its sliced variables; outputs equal the
    masked dense model's (up to float rounding)."""
    params = flax.core.unfreeze(variables["params"])
    stats = flax.core.unfreeze(variables.get("batch_stats", {}))
    units = resnet_units(params)
    new_p = jax.tree.map(np.asarray, params)
    new_s = jax.tree.map(np.asarray, stats)
    widths: dict[str, list[int]] = {}
    for u in units:
        keep = np.flatnonzero(np.asarray(masks.get(u.name, np.ones(u.width, bool))))
        if keep.size == 0:
            raise ValueError(f"unit {u.name} has no channel left; keep at least one")
        blk = new_p[u.block]
        blk[u.conv]["kernel"] = blk[u.conv]["kernel"][..., keep]
        for leaf in ("scale", "bias"):
            blk[u.bn][leaf] = blk[u.bn][leaf][keep]
        for leaf in ("mean", "var"):
            new_s[u.block][u.bn][leaf] = new_s[u.block][u.bn][leaf][keep]
        blk[u.next]["kernel"] = blk[u.next]["kernel"][:, :, keep, :]
        widths.setdefault(u.block, []).append(int(keep.size))
    order = sorted(widths, key=lambda k: tuple(int(x) for x in re.findall(r"\d+", k)))
    small = model.clone(inner_widths=tuple(tuple(widths[b]) for b in order))
    return small, {"params": new_p, "batch_stats": new_s}


def count_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def forward_flops(model, variables, image_shape: tuple[int, ...]) -> float:
    """FLOPs of one eval forward pass of a batch of one, from XLA's cost analysis."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))
