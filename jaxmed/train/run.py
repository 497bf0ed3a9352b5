"""One run of any method: what it is made of (`Run`), how long its parts last (`Durations`) and
`fit`, the only place that opens the metric writers and calls the loop.

A method builds a `Run` from its own pieces (a supervised `build_run`, TEAR's two-view stream and
memories, FoPro-KD's teacher beside the state, a continual phase) and hands it to `fit`, which
writes metrics.jsonl / TensorBoard, trains or resumes, selects on validation and evaluates on
test. Durations are given in epochs, steps or fractions of training and turned into steps here
(big_vision's `u.steps`), so that training code only deals with steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxmed import data as data_lib
from jaxmed.data.pipeline import Preprocess, train_stream
from jaxmed.train import build, sharding, steps
from jaxmed.train.evaluate import Evaluator
from jaxmed.train.loop import LoopSettings, train_loop
from jaxmed.train.writers import MetricWriter


@dataclasses.dataclass(frozen=True)
class Durations:
    """Steps of a run whose stream has `steps_per_epoch` steps per epoch and `total` in all."""

    steps_per_epoch: int
    total: int

    @property
    def num_epochs(self) -> int:
        """Epochs the stream must hold to cover `total` steps (the last one maybe partial)."""
        return max(-(-self.total // max(self.steps_per_epoch, 1)), 1)

    def epochs(self, n: float) -> int:
        """Steps of `n` epochs."""
        return int(round(n * self.steps_per_epoch))

    def fraction(self, f: float, *, at_epoch: bool = False) -> int:
        """The step `f` of the way through training; `at_epoch`: the first epoch boundary at
        or after it (the references switch DRW-like phases between epochs), capped at total."""
        step = f * self.total
        if not at_epoch:
            return int(step)
        spe = max(self.steps_per_epoch, 1)
        return min(int(math.ceil(round(step / spe, 9))) * spe, self.total)

    def epoch_start(self, f: float) -> int:
        """The first step of epoch int(f * epochs): where the references (LDAM-DRW's `epoch //
        160`, Fed-MAS's `epoch // int(0.8 * epochs)`) switch a phase, i.e. the last epoch
        boundary at or before `f` of training; capped at total (f = 1: never)."""
        spe = max(self.steps_per_epoch, 1)
        return min(int(math.floor(round(f * self.total / spe, 9))) * spe, self.total)

    def every(self, value: int) -> int:
        """A cadence key (eval_every, checkpoint_every): > 0 steps, 0 once per epoch, < 0
        never before the end (returned as 0)."""
        return value if value > 0 else (self.steps_per_epoch if value == 0 else 0)


def durations(train_cfg, steps_per_epoch: int) -> Durations:
    """`train.steps` if > 0, else `train.epochs` (at least 1) epochs of `steps_per_epoch`."""
    if steps_per_epoch <= 0:
        raise ValueError(f"a training epoch of {steps_per_epoch} steps: the training set is "
                         f"smaller than config.train.batch_size={train_cfg.batch_size}")
    total = train_cfg.steps if train_cfg.steps > 0 else max(train_cfg.epochs, 1) * steps_per_epoch
    return Durations(steps_per_epoch, int(total))


def steps_per_epoch(num_train: int, batch_size: int, what: str = "training images") -> int:
    """Full batches per epoch; an error naming the batch size when there is none."""
    spe = num_train // batch_size
    if spe == 0:
        raise ValueError(f"config.train.batch_size={batch_size} is larger than the {num_train} "
                         f"{what}")
    return spe


def loop_settings(train_cfg, d: Durations, **overrides) -> LoopSettings:
    """The loop's settings from `config.train`: the total fixed to `d.total` steps, and the
    eval / checkpoint cadences' 0 ('once per epoch') resolved to the run's own epoch, whatever
    its stream counts as one (an SSL run: a pass over the unlabeled set)."""
    settings = LoopSettings.from_config(train_cfg)
    settings.steps = d.total
    settings.epochs = d.num_epochs
    if settings.eval_every == 0:
        settings.eval_every = d.steps_per_epoch
    if settings.checkpoint_every <= 0:
        settings.checkpoint_every = d.steps_per_epoch
    for k, v in overrides.items():
        setattr(settings, k, v)
    return settings


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Everything `fit` needs. `train_step(state, global_batch) -> (state, metrics)`;
    `evaluate(state, split) -> metrics` (no split prefix); `make_stream() -> TrainStream`;
    `state_hooks`: factories `writer -> ((step, state) -> state)` for what acts on the state
    between steps and may log (pruning schedules, HTL identification). `step(state, batch,
    *step_args)`: the same step as a pure function of its arguments (`train_step` is it jitted
    with `step_args` bound), for the seed axis (`train.seeds`), which batches it over seeds:
    an argument that is the same object in every seed's run is shared, not stacked (FoPro-KD's
    frozen teacher). It may close over nothing that depends on the seed (the seed axis runs
    the first seed's `step` for every seed): what differs per seed lives in the state or in
    `step_args`. None: this run's seeds train one after another."""

    mesh: Any
    state: Any  # initial, replicated
    train_step: Callable
    make_stream: Callable
    evaluate: Callable[[Any, str], dict]
    settings: LoopSettings
    global_batch: int
    durations: Durations
    meta: dict = dataclasses.field(default_factory=dict)
    state_hooks: Sequence[Callable[[MetricWriter], Callable]] = ()
    eval_splits: tuple[str, ...] = ("val",)
    final_split: str = "test"
    # what the run was built from, for the method's own use after `fit`
    model: Any = None
    tx: Any = None
    ds: Any = None
    evaluator: Any = None
    extras: dict = dataclasses.field(default_factory=dict)
    step: Callable | None = None
    step_args: tuple = ()


@contextlib.contextmanager
def metric_writer(workdir: str):
    """metrics.jsonl + TensorBoard of `workdir` (written by the lead process), closed after."""
    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())
    try:
        yield writer
    finally:
        writer.close()


def fit(run: Run, workdir: str, *, hooks=()) -> tuple[Any, dict]:
    """Train (or resume) `run` in `workdir` and evaluate it on its final split; returns the
    final state and the final split's metrics (unprefixed). `hooks(step, state)` observe."""
    with metric_writer(workdir) as writer:
        return train_loop(
            workdir=workdir, settings=run.settings, state=run.state, train_step=run.train_step,
            make_stream=run.make_stream, evaluate=run.evaluate, mesh=run.mesh, writer=writer,
            meta=run.meta, hooks=hooks, state_hooks=[f(writer) for f in run.state_hooks],
            eval_splits=run.eval_splits, final_split=run.final_split,
            global_batch=run.global_batch)


def run_meta(config, **more) -> dict:
    """What a checkpoint records of the run: its config and the method's own labels."""
    return {"config": json.loads(config.to_json()), **more}


def build_run(config, seed: int | None = None, *, ds=None, mesh=None) -> Run:
    """A supervised run of `config` (seed: init and data order; default `config.seed`): data,
    model, optimizer, state, jitted steps, evaluator, stream, loop settings. Methods that train
    a plain classifier (PruneCXR, HTL, FoPro-KD's teacher stage) start from it."""
    from jaxmed.pruning import training as pruning_training

    seed = config.seed if seed is None else int(seed)
    mesh = mesh or sharding.make_mesh()
    tcfg = config.train
    sharding.check_global_batch(tcfg.batch_size, mesh)
    ds = ds or data_lib.build(config.data)
    info = ds.info
    size, channels = data_lib.image_size(config.data, info), data_lib.image_channels(
        config.data, info)
    model = build.build_model(config.model, info.num_classes)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    d = durations(tcfg, steps_per_epoch(len(ds["train"]), tcfg.batch_size,
                                        f"training images of {info.name}"))
    tx = build.make_optimizer(tcfg, d.total)
    variables = build.init_variables(model, config.model, init_rng, (size, size, channels))
    pruned = config.pruning.criterion != "none"
    masks = pruning_training.initial_masks(variables["params"]) if pruned else None
    state = build.create_state(variables, tx, state_rng, mesh, masks=masks)
    dtype = jnp.dtype(config.model.dtype)
    loss_name = "bce" if info.multi_label and tcfg.loss == "ce" else tcfg.loss
    pure_step = steps.make_train_step(
        model, tx, multi_label=info.multi_label, loss_name=loss_name,
        class_counts=info.class_counts, label_smoothing=tcfg.label_smoothing,
        compute_dtype=dtype, bn_frozen_from=d.epochs(tcfg.freeze_bn_after_epoch))
    eval_step = steps.jit_eval_step(
        steps.make_eval_step(model, multi_label=info.multi_label, compute_dtype=dtype), mesh)
    evaluator = Evaluator(eval_step, ds.splits, batch_size=tcfg.eval_batch_size,
                          preprocess=eval_preprocess(config, info, seed), mesh=mesh,
                          multi_label=info.multi_label, num_workers=config.data.num_workers)
    make_stream = stream_factory(config, ds["train"], info, seed, d)
    hooks = ([lambda writer: pruning_training.ScheduledPruning(config.pruning, writer)]
             if pruned else [])
    return Run(mesh, state, steps.jit_train_step(pure_step, mesh), make_stream, evaluator,
               loop_settings(tcfg, d), tcfg.batch_size, d, run_meta(config, seed=seed), hooks,
               model=model, tx=tx, ds=ds, evaluator=evaluator, step=pure_step)


def eval_preprocess(config, info, seed: int) -> Preprocess:
    """Unaugmented decoding at the run's image size and channels."""
    return Preprocess(data_lib.image_size(config.data, info),
                      data_lib.image_channels(config.data, info), "", seed,
                      config.data.on_error)


def stream_factory(config, source, info, seed: int, d: Durations, *, augment: str | None = None,
                   batch_size: int | None = None) -> Callable:
    """() -> a fresh training stream of `source` with `config.data.train_augment` (or
    `augment`), holding enough epochs for `d.total` steps."""
    pre = Preprocess(data_lib.image_size(config.data, info),
                     data_lib.image_channels(config.data, info),
                     config.data.train_augment if augment is None else augment, seed,
                     config.data.on_error)
    bs = batch_size or config.train.batch_size

    def make_stream():
        return train_stream(source, global_batch=bs, preprocess=pre, seed=seed,
                            num_epochs=d.num_epochs, num_workers=config.data.num_workers)

    return make_stream
