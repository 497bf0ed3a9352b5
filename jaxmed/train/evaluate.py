"""The one evaluator: every batch sharded over all devices of all processes, outputs fetched to
the host once per pass, padding removed, samples ordered by their stable index.

`predict` runs any jitted function of a global batch (an eval step, a sweep over pruning levels,
all of a continual learner's subnetworks); `Evaluator` adds the classification metrics.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import metrics
from jaxmed.data.pipeline import Preprocess, eval_batches
from jaxmed.train import sharding


def predict(fn: Callable[[dict], Any], batches: Iterable[dict], mesh, *, sample_axis: int = 0,
            keys: tuple[str, ...] = ("index",)) -> dict[str, np.ndarray]:
    """Outputs of `fn(global_batch)` over every valid sample of `batches`, sorted by index.

    `batches` yields this process's host-local rows (as `eval_batches` does); each becomes a
    global array sharded on the mesh's `data` axis. `fn` returns a dict of arrays whose
    `sample_axis` runs over the batch; the batch's own `keys` (index, label, attrs...) are
    returned beside them. Nothing is fetched until the pass is over: the outputs are
    concatenated on device, then fetched in one transfer (one all-gather per key across
    processes)."""
    outs, extras = [], []
    for b in batches:
        g = sharding.to_global(b, mesh)
        out = fn(g)
        chex.assert_axis_dimension(out[next(iter(out))], sample_axis, g["valid"].shape[0])
        outs.append(out)
        extras.append({"valid": g["valid"], **{k: g[k] for k in keys}})
    if not outs:
        raise ValueError("predict: the split yielded no batch")
    # Concatenated on device, then one transfer (one all-gather per key across processes).
    out, extra = sharding.to_host((_concat(outs, sample_axis), _concat(extras, 0)))
    valid = np.asarray(extra.pop("valid")).astype(bool)
    result = {k: np.compress(valid, v, axis=sample_axis) for k, v in out.items()}
    result.update(jax.tree.map(lambda v: np.asarray(v)[valid], extra))
    if "index" in result:
        order = np.argsort(result["index"], kind="stable")
        result = {k: _take(v, order, sample_axis if k in out else 0)
                  for k, v in result.items()}
    return result


def _concat(trees: list, axis: int):
    return jax.tree.map(lambda *xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=axis),
                        *trees)


def _take(v, order, axis):
    if isinstance(v, dict):
        return {k: _take(x, order, axis) for k, x in v.items()}
    return np.take(v, order, axis=axis)


def classification_metrics(out: dict, *, multi_label: bool, class_names=()) -> dict:
    """The kit's metrics of `predict`'s outputs (probs, label, loss): AUC, accuracy, ... and the
    mean loss; given `class_names` (single-label), each class's recall as `recall/<name>`."""
    fn = metrics.multi_label_metrics if multi_label else metrics.single_label_metrics
    result = fn(out["probs"], out["label"])
    result["loss"] = float(np.mean(out["loss"]))
    if class_names and not multi_label:
        recall = metrics.per_class_recall(np.asarray(out["label"]),
                                          np.asarray(out["probs"]).argmax(-1), len(class_names))
        result.update({f"recall/{n}": float(r) for n, r in zip(class_names, recall)})
    return result


class Evaluator:
    """evaluator(state, split) -> `metrics_fn` of a jitted eval step's per-sample outputs over
    every sample of the split exactly once (by default the step returns `probs` and `loss`, and
    the metrics are `classification_metrics`). A method's own metrics (group accuracies,
    segmentation scores) are its `metrics_fn`, over the step's outputs and the batch `keys`."""

    def __init__(self, eval_step, splits: dict, *, batch_size: int, preprocess: Preprocess,
                 mesh, multi_label: bool, num_workers: int = 0,
                 metrics_fn: Callable[[dict], dict] | None = None, class_names=(),
                 keys: tuple[str, ...] = ("index",)):
        sharding.check_global_batch(batch_size, mesh, key="eval_batch_size")
        self.eval_step, self.splits, self.batch_size = eval_step, splits, batch_size
        self.preprocess, self.mesh, self.multi_label = preprocess, mesh, multi_label
        self.num_workers, self.keys = num_workers, tuple(keys)
        self.metrics_fn = metrics_fn or (lambda out: classification_metrics(
            out, multi_label=multi_label, class_names=tuple(class_names)))

    def batches(self, split: str):
        return eval_batches(self.splits[split], global_batch=self.batch_size,
                            preprocess=self.preprocess, num_workers=self.num_workers)

    def predict(self, state, split: str) -> dict[str, np.ndarray]:
        """Per-sample outputs of the eval step (probs, loss, label...) and the batch's `keys`
        (index; attrs, mask where the metrics need them) of the split, sorted by index."""
        return predict(lambda b: self.eval_step(state, b), self.batches(split), self.mesh,
                       keys=self.keys)

    def metrics_of(self, out: dict) -> dict[str, float]:
        """The split's metrics from `predict`'s outputs."""
        return self.metrics_fn(out)

    def __call__(self, state, split: str) -> dict[str, float]:
        return self.metrics_of(self.predict(state, split))
