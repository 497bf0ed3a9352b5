"""When identification happens and what training does with it: the train loop's state hook.

`AttentionHook`: every `every` steps (K epochs) it identifies the HTL set with the current
params (`identify.identify_samples`, over the training split or, semi-supervised, the unlabeled
set) and either rewrites `state.sample_weight` (attention 'weight': lambda for HTL samples, 1
for the rest, until the next identification; the steps of `step.py` and TEAR's step read it) or
hands the stream sampling weights (attention 'oversample': HTL samples drawn lambda times as
often from the next epoch on; the stream's iterator checkpoints them). Each identification is
logged (`htl/*` metrics) and saved as `workdir/htl/step_<s>.npz` (index, score, disagree,
per-level outputs, the HTL set) and a line of `workdir/htl_history.jsonl`; after training, the
last one's top samples with dense and pruned predictions go to `workdir/htl_examples.npz`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import pruning
from jaxmed.data import augment
from jaxmed.methods.htl import identify
from jaxmed.train import sharding

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionHook:
    """A state hook (step, state) -> state of the train loop; see the module docstring.
    `with_writer` is its `Run.state_hooks` factory (writer -> hook)."""

    identify_fn: Callable
    batches: Callable[[], Any]  # () -> host-local batches of the identified set (eval mode)
    mesh: Any
    sparsities: tuple[float, ...]
    every: int  # steps between identifications (K epochs)
    total: int  # last step of the run (no identification there)
    attention: str  # 'weight', 'oversample' or 'none' (identify and log only)
    weight: float
    top_q: float | None
    positions: np.ndarray  # stable index of each position of the identified source
    stream: Callable[[], Any]  # () -> the current TrainStream (oversampling)
    workdir: str
    writer: Any = None  # the run's MetricWriter, set by `with_writer`
    seconds: list = dataclasses.field(default_factory=list)

    def with_writer(self, writer) -> "AttentionHook":
        self.writer = writer
        return self

    def __call__(self, step: int, state):
        if step == 0 or step % self.every or step >= self.total:
            return state
        t0 = time.time()
        out = identify.identify_samples(self.identify_fn, state.params, state.batch_stats,
                                        self.sparsities, self.batches(), self.mesh,
                                        top_q=self.top_q)
        htl, index = out["htl"], out["index"]
        if self.attention == "weight":
            table = np.ones(state.sample_weight.shape, np.float32)
            table[index[htl]] = self.weight
            state = state.replace(sample_weight=sharding.replicate(table, self.mesh))
        elif self.attention == "oversample":
            chosen = np.isin(self.positions, index[htl])
            w = np.where(chosen, self.weight, 1.0)
            self.stream().iterator.set_weights(w)
        seconds = time.time() - t0
        self.seconds.append(seconds)
        comp = identify.composition(htl, out["attrs"])
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
    masks = identify.level_masks(params, sparsities)
    dense, pruned = jax.device_get(examples_fn(params, batch_stats, masks, images))
    extra = {"mask": np.stack([r["mask"] for r in recs])} if "mask" in recs[0] else {}
    np.savez(path, index=np.asarray(indices), image=images, dense=dense, pruned=pruned,
             label=np.asarray([r["label"] for r in recs]),
             sparsities=np.asarray(sparsities), **extra)
