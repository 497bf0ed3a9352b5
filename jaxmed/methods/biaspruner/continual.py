"""The continual-learning frame BiasPruner and its baselines share: task streams, per-task
heads, training phases on the shared loop, task-agnostic evaluation, the accuracy matrix,
fairness, resume per task (orbax), and the driver.

Setting: T tasks in sequence, each with its own head (`heads`: [T, features, C_max], classes
beyond a task's own masked out by `cmask` [T, C_max]). Task-agnostic inference runs every
stored task's head (and, for subnetwork methods, its subnetwork), picks the task whose
prediction has the lowest entropy divided by log(number of its classes), and predicts that
task's class; a prediction is right when its (global) class is the sample's. Task-aware accuracy
uses the sample's own task. Fairness is measured on each task's test set with its own head
(task-aware): it asks whether a task's predictor is debiased, separately from task selection,
which is reported as task-selection accuracy.

A method is a `Method` record of plain functions over a pytree state (no object holds or jits
anything): `build(env) -> (setup, state)` (setup: the static values its jitted functions take,
e.g. the model and optimizer), `train_task(env, setup, state, t, workdir) -> state`, and
`predict(setup, state, batch, valid_tasks) -> decide(...)`, one jitted function over a global
batch, run by `jaxmed.train.evaluate.predict`. The state is saved through orbax after every
task (`workdir/<method>/tasks/<t + 1>`): a re-run resumes there.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmed import data as data_lib
from jaxmed import metrics
from jaxmed.data import augment, synthetic_bias
from jaxmed.data.pipeline import Preprocess, eval_batches, split_by_class_groups, train_stream
from jaxmed.data.sources import source_labels
from jaxmed.methods import supervised
from jaxmed.methods.biaspruner import report
from jaxmed.train import comparison, sharding, steps
from jaxmed.train.checkpoint import Checkpointer
from jaxmed.train.evaluate import predict as predict_sharded
from jaxmed.train.loop import LoopSettings, train_loop
from jaxmed.train.state import TrainState
from jaxmed.train.workdir import write_config
from jaxmed.train.writers import MetricWriter

log = logging.getLogger(__name__)
NEG = -1e9  # logit of a class a task does not have
TASK_SELECTIONS = ("entropy", "bn")
GROUP_KEYS = ("acc_aligned", "acc_conflicting", "aware_acc_aligned", "aware_acc_conflicting",
              "selection_aligned", "selection_conflicting")


def default_config() -> ml_collections.ConfigDict:
    c = supervised.default_config()
    c.method = "biaspruner"
    c.continual = ml_collections.ConfigDict(dict(
        tasks=((0, 1), (2, 3)),  # class groups of one dataset, one tuple per task
        task_split_files=(),  # or one reference split file per task
        methods=("biaspruner",),  # any of biaspruner, biaspruner_magnitude, packnet,
        # finetune, joint, ewc, lwf, lff: all run on the same tasks, compared in the report
        seeds=(0,),  # every method runs once per seed (config.seed = each); report: mean +- SE
        sensitive_attr="bias",  # attribute for fairness (synthetic: 'bias'; fitz: skin_group;
        # '' = none: fairness metrics are NaN)
        positive_class=1,  # within-task label counted as positive for TPR / FPR
        biased_epochs=4,  # BiasPruner / PackNet first phase (GCE / CE on free units)
        finetune_epochs=4,  # second phase (subnetwork fine-tuning)
        gamma=0.3,  # fraction of units (BiasPruner) / free weights (PackNet) pruned per task
        gce_q=0.7,
        alpha=0.0,  # > 0: fine-tune weights each sample by exp(alpha * its GCE loss)
        # True: then rescale the weights of the samples the GCE model gets wrong (S_bc) so that
        # they carry the same total weight as the rest (S_ba), as JTT's upweighting: with few
        # conflicting samples exp(alpha * GCE) alone makes them dominate and the subnetwork
        # learns the colour the other way round (subnetworks.finetune_weights)
        balance_groups=False,
        ewc_lambda=100.0,
        ewc_samples=256,
        lwf_lambda=1.0,
        lwf_temperature=2.0,
        lff_ema=0.7,  # LfF: EMA of the per-sample losses (the LfF code's ema_alpha)
        # Subnetworks at inference, all in one program: 'map' (lax.map, one after another) or
        # 'vmap' (batched over the stacked masks: grouped convolutions, measured 2.4-3.7x
        # slower on CPU and, for PruneCXR's levels, 1.75x slower on an H100).
        task_axis="map",
        # How task-agnostic inference picks the task: 'entropy' (the paper: the lowest
        # normalised predictive entropy) or 'bn', for the methods that store BatchNorm per task
        # (biaspruner, biaspruner_magnitude, packnet): the lowest negative log-likelihood of the
        # image's stem activations under each task's stored stem statistics (`subnetworks`
        # docstring; the single-network baselines keep 'entropy'). Entropy picks the wrong
        # task most of the time on the synthetic sequence: benchmarks/RESULTS.md.
        task_selection="entropy",
    ))
    c.train.optimizer = "adam"
    c.train.lr = 1e-4
    c.train.weight_decay = 5e-4
    c.data.synthetic_bias = synthetic_bias.default_config()  # read when data.name selects it
    return c


# ---------------------------------------------------------------------------------- tasks
class TaskSource:
    """A task's view of a source: within-task labels and the task id on every record."""

    def __init__(self, parent, task: int, label_map: dict[int, int]):
        self.parent, self.task, self.label_map = parent, task, label_map
        self.labels = np.asarray([label_map[int(y)] for y in source_labels(parent)]
                                 if len(parent) else [], np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, i):
        rec = dict(self.parent[i])
        rec["label"] = np.int32(self.label_map[int(rec["label"])])
        rec["attrs"] = {**rec["attrs"], "task": np.int32(self.task)}
        return rec


class ConcatSource:
    """Several sources one after another (joint training on all tasks so far)."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.labels = np.concatenate([p.labels for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, int(i), side="right") - 1)
        return self.parts[k][int(i) - int(self.offsets[k])]


@dataclasses.dataclass
class Task:
    id: int
    class_ids: list[int]  # global class ids of its within-task labels 0..C_t-1
    class_names: list[str]
    splits: dict[str, TaskSource]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


def split_files(cc) -> list[str]:
    return [f.strip() for f in cc.task_split_files if f.strip()]


def build_tasks(config) -> tuple[list[Task], data_lib.DatasetInfo]:
    cc = config.continual
    files = split_files(cc)
    if files:
        tasks, names = [], []
        info = None
        for t, path in enumerate(files):
            dcfg = copy.deepcopy(config.data)
            dcfg.split_file = path
            ds = data_lib.build(dcfg)
            info = ds.info
            ids = []
            for n in ds.info.class_names:  # tasks sharing class names share class ids
                if n not in names:
                    names.append(n)
                ids.append(names.index(n))
            lm = {c: c for c in range(ds.info.num_classes)}
            tasks.append(Task(t, ids, ds.info.class_names,
                              {s: TaskSource(ds[s], t, lm) for s in ds.splits}))
        return tasks, info
    ds = data_lib.build(config.data)
    if ds.info.multi_label:
        raise ValueError("continual tasks by class groups need single-label data")
    groups = [[int(c) for c in g] for g in cc.tasks]
    bad = [c for g in groups for c in g if not 0 <= c < ds.info.num_classes]
    if bad or not groups:
        raise ValueError(f"config.continual.tasks={cc.tasks!r} names classes {bad} outside the "
                         f"dataset's {ds.info.num_classes} classes (or no task)")
    per_split = {s: split_by_class_groups(ds[s], groups) for s in ds.splits}
    tasks = []
    for t, g in enumerate(groups):
        lm = {c: i for i, c in enumerate(g)}
        tasks.append(Task(t, g, [ds.info.class_names[c] for c in g],
                          {s: TaskSource(per_split[s][t], t, lm) for s in ds.splits}))
    return tasks, ds.info


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
class Env:
    """What every method needs: the config (host side only), the tasks, the data's shape and
    the mesh everything runs on."""

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
        return 1 + max(int(src[i]["index"]) for src in (t.splits["train"] for t in self.tasks)
                       for i in range(len(src)))

    def with_config(self, config) -> "Env":
        """The same tasks, data and mesh under another config (each seed's), keeping the index
        bound already computed (it walks every training record)."""
        env = Env(config, self.tasks, self.info, self.mesh)
        env.__dict__["index_bound"] = self.index_bound  # the cached_property's slot
        return env

    def preprocess(self, chain: str = "", seed: int = 0) -> Preprocess:
        size, _, channels = self.image_shape
        return Preprocess(size, channels, chain, seed, self.config.data.on_error)

    def batches(self, source, batch_size: int | None = None):
        """This process's share of every sample of `source` once, unaugmented, in order
        (padding marked invalid): feed to `jaxmed.train.evaluate.predict`."""
        return eval_batches(source, global_batch=batch_size or self.config.train.eval_batch_size,
                            preprocess=self.preprocess(seed=self.config.seed),
                            num_workers=self.config.data.num_workers)

    def replicate(self, tree):
        """A host pytree placed replicated on the mesh (as the jitted steps return it)."""
        return sharding.replicate(jax.device_get(tree), self.mesh)


def run_phase(env: Env, workdir: str, state: TrainState, step: Callable, source, epochs: int,
              seed: int) -> TrainState:
    """Train `epochs` epochs of `source` with `step(state, global_batch)` on the shared loop
    (with its checkpoints and resume; no evaluation). Returns the final state."""
    tcfg = env.config.train
    pre = env.preprocess(env.config.data.train_augment, seed)

    def make_stream():
        return train_stream(source, global_batch=tcfg.batch_size, preprocess=pre, seed=seed,
                            num_epochs=max(epochs, 1), num_workers=env.config.data.num_workers)

    settings = LoopSettings(epochs=epochs, log_every=tcfg.log_every, eval_every=-1,
                            checkpoint_every=10**9, keep_checkpoints=1, progress=tcfg.progress)
    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())
    try:
        state, _ = train_loop(workdir=workdir, settings=settings, state=env.replicate(state),
                              train_step=step, make_stream=make_stream,
                              evaluate=lambda s, split: {}, mesh=env.mesh, writer=writer,
                              eval_splits=(), final_split="", global_batch=tcfg.batch_size)
    finally:
        writer.close()
    return state


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

    build: Callable[[Env], tuple[Any, Any]]
    train_task: Callable[..., Any]
    predict: Callable[..., dict]
    mask_report: Callable[[Any], dict] | None = None


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


def evaluate(env: Env, method: Method, setup, state, upto: int,
             split: str = "test") -> list[TaskEval]:
    """Every task 0..upto on `split`, with tasks 0..upto stored: one sharded pass per task
    (`jaxmed.train.evaluate.predict`: all devices of all processes, one fetch per pass)."""
    cc = env.config.continual
    tasks, t_max = env.tasks, env.num_tasks
    valid = sharding.replicate(np.arange(t_max) <= upto, env.mesh)
    class_ids = np.full((t_max, env.max_classes), -1)
    for t in tasks:
        class_ids[t.id, : t.num_classes] = t.class_ids
    fn = functools.partial(method.predict, setup, state, valid_tasks=valid)
    out = []
    for task in tasks[: upto + 1]:
        r = predict_sharded(fn, env.batches(task.splits[split]), env.mesh,
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


# ------------------------------------------------------------------------------- driver
def run(config, workdir: str, methods: dict[str, Method]) -> dict:
    """Run every method of config.continual.methods over the task sequence once per seed of
    config.continual.seeds (`jaxmed.train.comparison.run_all`: workdir/runs/<method>/seed_<s>,
    finished runs read back), then report means and standard errors over the seeds. Returns
    {'<method>/<metric>': mean over seeds, '<method>/<metric>_std' / '_se': its sample sd and
    standard error}."""
    write_config(config, workdir)
    tasks, info = build_tasks(config)
    attr = config.continual.sensitive_attr
    if attr and attr not in info.attr_names:
        raise ValueError(f"config.continual.sensitive_attr={attr!r} is not an attribute of "
                         f"{info.name}; its attributes: {info.attr_names} ('' skips fairness)")
    names, seeds = tuple(config.continual.methods), tuple(config.continual.seeds)
    comparison.check_methods_and_seeds(names, seeds, sorted(methods), "continual")
    env = Env(config, tasks, info)
    sharding.check_global_batch(config.train.batch_size, env.mesh)
    sharding.check_global_batch(config.train.eval_batch_size, env.mesh, key="eval_batch_size")
    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())

    def run_one(name: str, seed: int, run_workdir: str) -> dict:
        cfg = copy.deepcopy(config)
        cfg.seed = int(seed)
        i = names.index(name) * len(seeds) + seeds.index(seed)
        return run_method(env.with_config(cfg), run_workdir, name, methods[name], writer,
                          i)["summary"]

    try:
        comparison.run_all(workdir, names, seeds, run_one)
    finally:
        writer.close()
    details = {m: [load_result(comparison.run_dir(workdir, m, s)) for s in seeds]
               for m in names}
    summary = report.summarize(details)
    if sharding.is_lead_process():
        report.write_report(os.path.join(workdir, "report"), details, tasks,
                            config.continual.task_selection)
    return {f"{m}/{k}": v for m, row in summary.items() for k, v in row.items()}


def load_result(run_workdir: str) -> dict:
    """A finished run's results.json (written by `run_method`), arrays as numpy."""
    with open(os.path.join(run_workdir, "results.json")) as f:
        r = json.load(f)
    for k in ("agnostic", "aware", "selection"):
        r[k] = np.asarray(r[k], np.float64)
    return r


def run_method(env: Env, workdir: str, name: str, method: Method, writer, m_index: int) -> dict:
    """Train one method through the task sequence, resuming finished tasks from their orbax
    checkpoints (`workdir/tasks/<t + 1>`: the state after task t)."""
    setup, state = method.build(env)
    state = env.replicate(state)
    t_max = env.num_tasks
    agnostic = np.full((t_max, t_max), np.nan)
    aware = np.full((t_max, t_max), np.nan)
    selection = np.full((t_max, t_max), np.nan)
    evals = []
    store = Checkpointer(os.path.join(workdir, "tasks"), keep=0, async_save=False)
    try:
        done = set(store.all_steps())
        for t, task in enumerate(env.tasks):
            if t + 1 in done:
                state, _ = store.restore(t + 1, state)
            else:
                log.info("%s: task %d / %d", name, t + 1, t_max)
                state = env.replicate(method.train_task(env, setup, state, t,
                                                        os.path.join(workdir, f"task_{t}")))
                store.save(t + 1, state, meta={"method": name, "task": t})
                store.wait()
            evals = evaluate(env, method, setup, state, t)
            for j, e in enumerate(evals):
                agnostic[t, j], aware[t, j], selection[t, j] = (e.agnostic_acc, e.aware_acc,
                                                                e.selection_acc)
            writer.write(1000 * m_index + t, {f"test/{name}/acc_task{j}": e.agnostic_acc
                                              for j, e in enumerate(evals)})
    finally:
        store.close()
    summary = metrics.continual_summary(agnostic)
    summary.update({f"aware_{k}": v for k, v in metrics.continual_summary(aware).items()})
    summary["task_selection"] = float(np.nanmean(selection[-1]))
    summary["task_selection_entropy"] = float(np.mean([e.selection_entropy_acc for e in evals]))
    fair = [e.fairness for e in evals]
    for k in ("eopp0", "eopp1", "eodd", "dp_ratio"):
        summary[k] = float(np.nanmean([f[k] for f in fair]))
    for k in GROUP_KEYS:  # final accuracies on the aligned / conflicting test images
        vals = [e.groups.get(k, np.nan) for e in evals]
        summary[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    writer.write(1000 * m_index + t_max, {f"test/{name}/{k}": v for k, v in summary.items()})
    result = {"summary": summary, "agnostic": agnostic, "aware": aware, "selection": selection,
              "fairness": fair,
              "masks": method.mask_report(jax.device_get(state)) if method.mask_report else None}
    if sharding.is_lead_process():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                       for k, v in result.items()}, f, indent=2, default=float)
    return result
