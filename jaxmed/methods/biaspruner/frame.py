"""The continual-learning frame BiasPruner and its baselines share: per-task heads, the task
sequence a run trains through (`TaskSequence`), training phases through `train.run.fit`,
task-agnostic evaluation and its accuracy matrices' entries, fairness.

Setting: T tasks in sequence, each with its own head (`heads`: [T, features, C_max], classes
beyond a task's own masked out by `cmask` [T, C_max]). Task-agnostic inference runs every
stored task's head (and, for subnetwork methods, its subnetwork), picks the task whose
prediction has the lowest entropy divided by log(number of its classes), and predicts that
task's class; a prediction is right when its (global) class is the sample's. Task-aware accuracy
uses the sample's own task. Fairness is measured on each task's test set with its own head
(task-aware): it asks whether a task's predictor is debiased, separately from task selection,
which is reported as task-selection accuracy.

A method is a `Method` record of plain functions over a pytree state (no object holds or jits
anything): `build(seq) -> (setup, state)` (setup: the static values its jitted functions take,
e.g. the model and optimizer), `train_task(seq, setup, state, t, workdir) -> state`, and
`predict(setup, state, batch, valid_tasks) -> decide(...)`, one jitted function over a global
batch, run by `jaxmed.train.evaluate.predict`; a method whose task is one training phase also
gives `task_run` (the phase's `Run` and what turns its trained state into the method's), so
that its seeds can train each task together (the seed axis). The driver (`run.py`) saves the
state through orbax after every task, so a re-run resumes there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import data as data_lib
from jaxmed import metrics
from jaxmed.data import augment
from jaxmed.data.pipeline import eval_batches
from jaxmed.data.sources import record_indices
from jaxmed.methods.biaspruner.tasks import Task
from jaxmed.train import run as run_lib
from jaxmed.train import sharding, steps
from jaxmed.train.evaluate import predict as predict_sharded
from jaxmed.train.loop import LoopSettings
from jaxmed.train.state import TrainState

NEG = -1e9  # logit of a class a task does not have
TASK_SELECTIONS = ("entropy", "bn")
GROUP_KEYS = ("acc_aligned", "acc_conflicting", "aware_acc_aligned", "aware_acc_conflicting",
              "selection_aligned", "selection_conflicting")


# ---------------------------------------------------------------------------------- heads
def features(model, params, stats, images, *, train: bool):
    """Penultimate features of uint8 `images` (normalised here) and the BatchNorm statistics
    (updated in train mode): the backbone call every continual step shares."""
    (_, feats), new_stats = steps.forward(model, {"params": params, "batch_stats": stats},
                                          augment.normalize(images), train=train,
                                          features=True)
    return feats, new_stats


def init_heads(rng, num_tasks: int, features: int, max_classes: int) -> dict:
    k = jax.random.normal(rng, (num_tasks, features, max_classes)) / np.sqrt(features)
    return {"kernel": k.astype(jnp.float32), "bias": jnp.zeros((num_tasks, max_classes))}


def class_mask(tasks: list[Task], num_tasks: int, max_classes: int) -> np.ndarray:
    m = np.zeros((num_tasks, max_classes), bool)
    for t in tasks:
        m[t.id, : t.num_classes] = True
    return m


def head_logits(feats, heads, cmask):
    """feats [B, F] -> logits of every head [B, T, C], absent classes at NEG."""
    logits = jnp.einsum("bf,tfc->btc", feats.astype(jnp.float32), heads["kernel"]) + heads["bias"]
    return jnp.where(cmask[None], logits, NEG)


def pick(per_task, task_ids):
    """[B, T, ...] -> [B, ...] at each sample's task."""
    return jnp.take_along_axis(per_task, task_ids[:, None, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass
class TaskSequence:
    """The task sequence one run trains through: its config (host side only; each sub-run's),
    the tasks, the data's shape and the mesh everything runs on."""

    config: Any
    tasks: list[Task]
    info: data_lib.DatasetInfo
    mesh: Any = dataclasses.field(default_factory=sharding.make_mesh)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = data_lib.image_size(self.config.data, self.info)
        return (size, size, data_lib.image_channels(self.config.data, self.info))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def max_classes(self) -> int:
        return max(t.num_classes for t in self.tasks)

    @property
    def cmask(self) -> np.ndarray:
        return class_mask(self.tasks, self.num_tasks, self.max_classes)

    @functools.cached_property
    def index_bound(self) -> int:
        """1 + the largest stable record index of any task's training set: the size of
        per-sample tables (fine-tuning weights), the same for every task so that the steps
        taking them compile once."""
        return 1 + max(int(record_indices(t.splits["train"]).max(initial=-1))
                       for t in self.tasks)

    def with_config(self, config) -> "TaskSequence":
        """The same tasks, data and mesh under another config (each seed's), keeping the index
        bound already computed (it walks every training record)."""
        seq = TaskSequence(config, self.tasks, self.info, self.mesh)
        seq.__dict__["index_bound"] = self.index_bound  # the cached_property's slot
        return seq

    def batches(self, source, batch_size: int | None = None):
        """This process's share of every sample of `source` once, unaugmented, in order
        (padding marked invalid): feed to `jaxmed.train.evaluate.predict`."""
        return eval_batches(source, global_batch=batch_size or self.config.train.eval_batch_size,
                            preprocess=run_lib.eval_preprocess(self.config, self.info,
                                                               self.config.seed),
                            num_workers=self.config.data.num_workers)

    def replicate(self, tree):
        """A host pytree placed replicated on the mesh (as the jitted steps return it)."""
        return sharding.replicate(jax.device_get(tree), self.mesh)


def phase_run(seq: TaskSequence, state: TrainState, step: Callable, source, epochs: int,
              seed: int, *, pure: Callable | None = None, step_args: tuple = ()) -> run_lib.Run:
    """The `Run` of one training phase: `epochs` epochs of `source` (augmented, shuffled with
    `seed`) with the jitted `step(state, global_batch)`, no evaluation. `pure(state, batch,
    *step_args)`: the same step unjitted, for the seed axis (`Run.step`); without it the
    phase's seeds train one after another."""
    cfg, tcfg = seq.config, seq.config.train
    spe = run_lib.steps_per_epoch(len(source), tcfg.batch_size, "training images of the task")
    d = run_lib.Durations(spe, total=spe * epochs)
    settings = LoopSettings(epochs=epochs, steps=d.total, log_every=tcfg.log_every,
                            eval_every=-1, checkpoint_every=10**9, keep_checkpoints=1,
                            progress=tcfg.progress)
    return run_lib.Run(seq.mesh, seq.replicate(state), step,
                       run_lib.stream_factory(cfg, source, seq.info, seed, d),
                       lambda s, split: {}, settings, tcfg.batch_size, d, eval_splits=(),
                       final_split="", step=pure, step_args=tuple(step_args))


def run_phase(seq: TaskSequence, workdir: str, state: TrainState, step: Callable, source,
              epochs: int, seed: int) -> TrainState:
    """Train one phase (`phase_run`) through `train.run.fit`, with its checkpoints and resume.
    Returns the final state."""
    return run_lib.fit(phase_run(seq, state, step, source, epochs, seed), workdir)[0]


def state_from(params, batch_stats, tx, rng) -> TrainState:
    return TrainState.create({"params": params, "batch_stats": batch_stats}, tx, rng)


# --------------------------------------------------------------------------- evaluation
def normalized_entropy(logits, cmask):
    """Predictive entropy / log(C_t) of every task's prediction: logits [B, T, C]."""
    p = jax.nn.softmax(logits, axis=-1)
    ent = -jnp.sum(jnp.where(cmask[None], p * jnp.log(jnp.maximum(p, 1e-12)), 0.0), -1)
    return ent / jnp.log(jnp.maximum(cmask.sum(-1), 2))[None]


def lowest(scores, valid_tasks):
    """Index of the lowest-scoring task among the valid (stored) ones: scores [B, T] -> [B]."""
    return jnp.argmin(jnp.where(valid_tasks[None], scores, jnp.inf), axis=-1)


def select_task(logits, cmask, valid_tasks):
    """Index of the lowest normalised-entropy task among the valid (stored) ones: [B]."""
    return lowest(normalized_entropy(logits, cmask), valid_tasks)


def decide(logits, cmask, valid_tasks, stem_nll=None) -> dict:
    """Traced inside each method's jitted `predict`: the selected task, its within-task
    prediction, and every task's own prediction (task-aware) [B, T]. The task is the lowest
    normalised entropy's (the paper), or, given `stem_nll` [B, T] (methods with per-task
    BatchNorm under `continual.task_selection='bn'`), the lowest stem likelihood score's;
    `task_entropy` is the entropy rule's choice either way (reported beside it)."""
    by_entropy = select_task(logits, cmask, valid_tasks)
    task = by_entropy if stem_nll is None else lowest(stem_nll, valid_tasks)
    return {"task": task, "task_entropy": by_entropy,
            "pred": jnp.argmax(pick(logits, task), -1), "per_task": jnp.argmax(logits, -1)}


@dataclasses.dataclass(frozen=True)
class Method:
    """A continual method as plain functions (see the module docstring)."""

    build: Callable[[TaskSequence], tuple[Any, Any]]
    train_task: Callable[..., Any]
    predict: Callable[..., dict]
    mask_report: Callable[[Any], dict] | None = None
    # (seq, setup, state, t) -> (the task's phase `Run` with a pure step, finish: trained
    # TrainState -> state): a method whose task is one phase; its seeds' tasks can train as
    # one program (run.run_seeds). None: seeds one after another.
    task_run: Callable[..., tuple[Any, Callable]] | None = None


@dataclasses.dataclass
class TaskEval:
    agnostic_acc: float
    aware_acc: float
    selection_acc: float
    fairness: dict
    selection_entropy_acc: float
    y: np.ndarray
    aware_pred: np.ndarray
    groups: dict = dataclasses.field(default_factory=dict)


ALIGNED = "aligned"  # record attribute marking bias-aligned (1) / bias-conflicting (0) images


def group_accuracies(agnostic_correct, aware_correct, selected, aligned) -> dict:
    """Task-agnostic and task-aware accuracy, and task-selection accuracy, on the bias-aligned
    and the bias-conflicting images (NaN where the data has no `aligned` marker or a group is
    empty)."""
    out = {}
    for name, g in (("aligned", 1), ("conflicting", 0)):
        sel = np.asarray(aligned) == g
        for key, c in (("acc", agnostic_correct), ("aware_acc", aware_correct),
                       ("selection", selected)):
            out[f"{key}_{name}"] = float(np.mean(c[sel])) if sel.any() else float("nan")
    return out


def evaluate(seq: TaskSequence, method: Method, setup, state, upto: int,
             split: str = "test") -> list[TaskEval]:
    """Every task 0..upto on `split`, with tasks 0..upto stored: one sharded pass per task
    (`jaxmed.train.evaluate.predict`: all devices of all processes, one fetch per pass)."""
    cc = seq.config.continual
    tasks, t_max = seq.tasks, seq.num_tasks
    valid = sharding.replicate(np.arange(t_max) <= upto, seq.mesh)
    class_ids = np.full((t_max, seq.max_classes), -1)
    for t in tasks:
        class_ids[t.id, : t.num_classes] = t.class_ids
    fn = functools.partial(method.predict, setup, state, valid_tasks=valid)
    out = []
    for task in tasks[: upto + 1]:
        r = predict_sharded(fn, seq.batches(task.splits[split]), seq.mesh,
                            keys=("index", "label", "attrs"))
        sel, y = r["task"], r["label"]
        aware = r["per_task"][:, task.id]
        attr = r["attrs"].get(cc.sensitive_attr, np.full(len(y), -1))
        correct = class_ids[sel, r["pred"]] == np.asarray(task.class_ids)[y]
        groups = group_accuracies(correct, aware == y, sel == task.id,
                                  r["attrs"].get(ALIGNED, np.full(len(y), -1)))
        out.append(TaskEval(float(np.mean(correct)), float(np.mean(aware == y)),
                            float(np.mean(sel == task.id)),
                            metrics.fairness(y, aware, attr, cc.positive_class),
                            float(np.mean(r["task_entropy"] == task.id)), y, aware, groups))
    return out
