"""Identification over the whole training set, and the hook that turns it into attention.

`make_identify_fn` compiles one program per task: dense forward + every pruning level
(`identify.make_level_predictor`, levels by `lax.map` or `vmap`, masks only) + the per-sample
disagreement, on a batch sharded over every device. `identify` runs it over the training split
(eval preprocessing: no augmentation) through `jaxmed.train.evaluate.predict`, so the outputs
are fetched once per pass and come back sorted by the records' stable index.

`HtlHook` is a train-loop state hook: every `every` steps (K epochs) it identifies the HTL set
with the current params and either rewrites `state.sample_weight` (attention 'weight': lambda for
HTL samples, 1 for the rest, until the next identification; the table is `state.sample_weight`
of the supervised steps or `state.ssl.weights` of the TEAR step, see `WEIGHT_TABLES`) or hands
the stream sampling weights
(attention 'oversample': HTL samples drawn lambda times as often from the next epoch on; the
stream's iterator checkpoints them). Each identification is logged (`htl/*` metrics) and saved
as `workdir/htl/step_<s>.npz` (index, score, disagree, per-level outputs, the HTL set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import pruning
from jaxmed.data import augment
from jaxmed.methods.htl import identify as I
from jaxmed.train import sharding
from jaxmed.train.evaluate import predict

log = logging.getLogger(__name__)


def make_identify_fn(model, *, task: str, iou_threshold: float = 0.5, rule: str = "majority",
                     level_axis: str = "map", mesh=None, compute_dtype=jnp.float32) -> Callable:
    """A jitted (params, stacked_masks, batch_stats, batch) -> {'disagree' [B], 'score' [B],
    'levels' [B, L]} (levels: the pruned top-1 class, or the IoU of each pruned mask with the
    dense one). task: 'classification' or 'segmentation'."""
    def apply_fn(params, x, batch_stats):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    predictor = I.make_level_predictor(apply_fn, task=task, level_axis=level_axis, mesh=mesh)

    def fn(params, stacked_masks, batch_stats, batch):
        x = augment.normalize(batch["image"], dtype=compute_dtype)
        dense, levels = predictor(params, stacked_masks, x, batch_stats)
        if task == "classification":
            disagree, score = I.classification_disagreement(dense, levels)
            per_level = jnp.argmax(levels, -1).T.astype(jnp.float32)
        else:
            disagree, score = I.segmentation_disagreement(levels, iou_threshold, rule)
            per_level = levels.T.astype(jnp.float32)
        return {"disagree": disagree, "score": score, "levels": per_level,
                "dense": (jnp.argmax(dense, -1) if task == "classification"
                          else jnp.sum(dense > 0, (1, 2, 3))).astype(jnp.int32)}

    if mesh is None:
        return jax.jit(fn)
    rep, dat = sharding.replicated(mesh), sharding.data_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, rep, rep, dat), out_shardings=dat)


def identify(identify_fn: Callable, params, batch_stats, sparsities: Sequence[float],
             batches, mesh, *, top_q: float | None = None) -> dict[str, np.ndarray]:
    """Identification over every sample of `batches` (host-local, as `eval_batches` yields):
    {'index', 'attrs', 'disagree', 'score', 'levels', 'dense', 'htl'} sorted by index, 'htl' the
    HTL set (`identify.select_htl`). Masks of all levels come from one sort of the params."""
    masks = I.level_masks(params, sparsities)
    out = predict(lambda b: identify_fn(params, masks, batch_stats, b), batches, mesh,
                  keys=("index", "attrs"))
    out["htl"] = I.select_htl(out["disagree"], out["score"], top_q)
    return out


def composition(htl: np.ndarray, attrs: dict[str, np.ndarray]) -> dict[str, float]:
    """HTL-set size and, per attribute value, its share of the HTL set and of all samples."""
    out = {"size": float(htl.sum()), "fraction": float(htl.mean())}
    for name in sorted(attrs):
        values = np.asarray(attrs[name])
        for v in sorted(set(values.tolist()) - {-1}):
            sel = values == v
            out[f"share_{name}_{v}"] = float(sel[htl].mean()) if htl.any() else 0.0
            out[f"base_{name}_{v}"] = float(sel.mean())
            out[f"caught_{name}_{v}"] = float(htl[sel].mean()) if sel.any() else 0.0
    return out


# where a state keeps its per-sample loss weights: HtlState (trainer.py) / TEAR's SSLState
WEIGHT_TABLES = ("sample_weight", "ssl.weights")


def weight_table(state, where: str):
    """The state's per-sample loss-weight table (indexed by the records' stable index)."""
    return state.sample_weight if where == "sample_weight" else state.ssl.weights


def with_weight_table(state, where: str, table):
    if where == "sample_weight":
        return state.replace(sample_weight=table)
    return state.replace(ssl=state.ssl.replace(weights=table))


@dataclasses.dataclass
class HtlHook:
    """state hook (step, state) -> state of the train loop; see the module docstring."""

    identify_fn: Callable
    batches: Callable[[], Any]  # () -> host-local batches of the training split (eval mode)
    mesh: Any
    sparsities: tuple[float, ...]
    every: int  # steps between identifications (K epochs)
    total: int  # last step of the run (no identification there)
    attention: str  # 'weight', 'oversample' or 'none' (identify and log only)
    weight: float
    top_q: float | None
    positions: np.ndarray  # stable index of each training-source position
    stream: Callable[[], Any]  # () -> the current TrainStream (oversampling)
    writer: Any
    workdir: str
    table: str = "sample_weight"  # one of WEIGHT_TABLES: where attention 'weight' writes
    seconds: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.table not in WEIGHT_TABLES:
            raise ValueError(f"HtlHook.table={self.table!r}: one of {WEIGHT_TABLES}")

    def __call__(self, step: int, state):
        if step == 0 or step % self.every or step >= self.total:
            return state
        t0 = time.time()
        out = identify(self.identify_fn, state.params, state.batch_stats, self.sparsities,
                       self.batches(), self.mesh, top_q=self.top_q)
        htl, index = out["htl"], out["index"]
        if self.attention == "weight":
            table = np.ones(weight_table(state, self.table).shape, np.float32)
            table[index[htl]] = self.weight
            state = with_weight_table(state, self.table, sharding.replicate(table, self.mesh))
        elif self.attention == "oversample":
            chosen = np.isin(self.positions, index[htl])
            w = np.where(chosen, self.weight, 1.0)
            self.stream().iterator.set_weights(w)
        seconds = time.time() - t0
        self.seconds.append(seconds)
        comp = composition(htl, out["attrs"])
        self.writer.write(step, {f"htl/{k}": v for k, v in comp.items()}
                          | {"htl/identify_seconds": seconds})
        if sharding.is_lead_process():
            d = os.path.join(self.workdir, "htl")
            os.makedirs(d, exist_ok=True)
            np.savez(os.path.join(d, f"step_{step:07d}.npz"), index=index, htl=htl,
                     score=out["score"], disagree=out["disagree"], levels=out["levels"],
                     **{f"attr_{k}": v for k, v in out["attrs"].items()})
            with open(os.path.join(self.workdir, "htl_history.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "seconds": seconds, **comp}) + "\n")
        log.info("HTL identification at step %d: %d of %d samples (%.1fs)", step,
                 int(htl.sum()), len(htl), seconds)
        return state


def read_history(workdir: str) -> list[dict]:
    """The identifications of a run (the last record per step)."""
    path = os.path.join(workdir, "htl_history.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def make_examples_fn(model, *, task: str, compute_dtype=jnp.float32) -> Callable:
    """jitted (params, batch_stats, level_masks [L, ...], images) -> dense and per-level pruned
    predictions for the report's grid: masks [B, H, W] / [L, B, H, W] or top-1 [B] / [L, B]."""
    def fn(params, batch_stats, stacked, images):
        x = augment.normalize(images, dtype=compute_dtype)

        def run(p):
            y = model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)
            return (y[..., 0] > 0).astype(jnp.uint8) if task == "segmentation" else \
                jnp.argmax(y, -1)

        return run(params), pruning.over_stack(lambda m: run(pruning.apply_masks(params, m)),
                                               stacked, "map")

    return jax.jit(fn)


def save_last_examples(workdir: str, examples_fn, state, sparsities, source, positions,
                       preprocess, grid: int) -> None:
    """workdir/htl_examples.npz: the `grid` highest-scoring HTL samples of the run's last
    identification (the highest scores when the set is empty); lead process only."""
    d = os.path.join(workdir, "htl")
    last = sorted(os.listdir(d)) if os.path.isdir(d) else []
    if not last or not sharding.is_lead_process():
        return
    saved = np.load(os.path.join(d, last[-1]))
    order = np.argsort(-saved["score"], kind="stable")
    chosen = [i for i in order if saved["htl"][i]][:grid] or list(order[:grid])
    save_examples(os.path.join(workdir, "htl_examples.npz"), examples_fn, state, sparsities,
                  source, saved["index"][chosen], positions, preprocess)


def save_examples(path: str, examples_fn, state, sparsities, source, indices, positions,
                  preprocess) -> None:
    """Images, true masks / labels, dense and pruned predictions of the given samples."""
    pos = {int(i): p for p, i in enumerate(positions)}
    recs = [preprocess(0, source[pos[int(i)]]) for i in indices]
    if not recs:
        return
    images = np.stack([r["image"] for r in recs])
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    masks = I.level_masks(params, sparsities)
    dense, pruned = jax.device_get(examples_fn(params, batch_stats, masks, images))
    extra = {"mask": np.stack([r["mask"] for r in recs])} if "mask" in recs[0] else {}
    np.savez(path, index=np.asarray(indices), image=images, dense=dense, pruned=pruned,
             label=np.asarray([r["label"] for r in recs]),
             sparsities=np.asarray(sparsities), **extra)
