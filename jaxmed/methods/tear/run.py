"""One semi-supervised (algorithm, seed) run on the kit: the labeled / unlabeled split, the
two-view stream, the state with the algorithm's memories, the jitted step (`build_ssl_run`),
and the comparison's `run_one`.

An epoch is one pass over the unlabeled stream (mu B images per step), so `train.epochs` and the
eval / checkpoint cadences' 'once per epoch' (0) count in those passes; supervised-only trains
the same number of steps of B labeled images.

`config.ssl.include_labeled_in_unlabeled` (default True, USB's `include_lb_to_ulb`): the
unlabeled stream draws from the labeled images too (USB concatenates [labeled, unlabeled]);
they keep their own stable indices, so the memories hold a row for them, FlexMatch counts them
in its unlabeled total (USB's ulb_dest_len), and the pseudo-label accuracy, whose truth table
covers the unlabeled set only, leaves them out. `run.extras['unlabeled']` stays the unlabeled
set alone (HTL identifies among it); `extras['unlabeled_stream']` is what the stream draws.

`config.ssl.eval_ema` (default True, USB's convention): validation, selection and the final
test evaluate the EMA model of the student (step.py, `make_eval_step`); the raw student's
metrics come beside them as `student/...` (final: `test/student/auc`, ...).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp

from jaxmed import data as data_lib
from jaxmed.data.pipeline import (
    Preprocess,
    TrainStream,
    TwoViews,
    semi_supervised_stream,
    train_stream,
)
from jaxmed.data.sources import ConcatSource, record_indices
from jaxmed.methods.tear import algorithms
from jaxmed.methods.tear import data as ssl_data
from jaxmed.methods.tear.device_augment import strong_augment
from jaxmed.methods.tear.step import (
    Hyper,
    create_ssl_state,
    init_memory,
    make_eval_step,
    make_ssl_step,
)
from jaxmed.train import build, sharding, steps
from jaxmed.train import run as run_lib
from jaxmed.train import seeds as train_seeds
from jaxmed.train.evaluate import Evaluator, classification_metrics

log = logging.getLogger(__name__)


class _AsLabeled:
    def __call__(self, batch):
        return {"labeled": batch}


def split(config, ds, unlabeled: bool = True):
    """(labeled, unlabeled) sources of `config.ssl` (a stratified subset, or the list files),
    refused naming the key when they cannot fill the run's batches (`unlabeled`: the algorithm
    draws mu B unlabeled images a step)."""
    s = config.ssl
    names = list(ds.info.class_names)
    batches = ssl_data.batches(config, unlabeled)
    if s.num_labeled > 0:
        return ssl_data.from_num_labeled(ds["train"], s.num_labeled, s.split_seed,
                                         class_names=names, **batches)
    return ssl_data.from_lists(s.labeled_list, s.unlabeled_list, config.data.root,
                               ds.info.num_classes,
                               held_out={k: v for k, v in ds.splits.items() if k != "train"},
                               class_names=names, **batches)


def ema_and_student_metrics(out: dict, class_names=()) -> dict:
    """The evaluator's metrics of `make_eval_step(eval_ema=True)`'s outputs: the EMA model's
    (unprefixed, as every run's) and the raw student's under `student/`."""
    res = classification_metrics(out, multi_label=False, class_names=tuple(class_names))
    student = classification_metrics(
        {"probs": out["student_probs"], "loss": out["student_loss"], "label": out["label"]},
        multi_label=False, class_names=tuple(class_names))
    res.update({f"student/{k}": v for k, v in student.items()})
    return res


def unlabeled_stream_source(config, labeled, unlabeled):
    """What the unlabeled stream draws from: [labeled, unlabeled] with
    `ssl.include_labeled_in_unlabeled` (USB's include_lb_to_ulb), else the unlabeled set."""
    if config.ssl.include_labeled_in_unlabeled:
        return ConcatSource([labeled, unlabeled])
    return unlabeled


def build_ssl_run(config, method: str, seed: int | None = None) -> run_lib.Run:
    """The kit `Run` of one algorithm (seed: init and data order; default config.seed);
    `run.extras` holds labeled, unlabeled, unlabeled_stream, hyper and algorithm."""
    alg = algorithms.get(method)
    seed = config.seed if seed is None else int(seed)
    s, tcfg = config.ssl, config.train
    mesh = sharding.make_mesh()
    sharding.check_global_batch(tcfg.batch_size, mesh)
    ds = data_lib.build(config.data)
    info = ds.info
    if info.multi_label:
        raise ValueError(f"{info.name}: semi-supervised methods need single-label data")
    labeled, unlabeled = split(config, ds, alg.unlabeled)
    num_slots = int(max(record_indices(labeled).max(), record_indices(unlabeled).max())) + 1
    stream_u = unlabeled_stream_source(config, labeled, unlabeled)
    b = tcfg.batch_size
    d = run_lib.durations(tcfg, max(len(stream_u) // (s.mu * b), 1))
    size = data_lib.image_size(config.data, info)
    channels = data_lib.image_channels(config.data, info)
    model = build.build_model(config.model, info.num_classes)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    tx = build.make_optimizer(tcfg, d.total, decay_mask=build.kernels_only)  # spec: kernels only
    variables = build.init_variables(model, config.model, init_rng, (size, size, channels))
    _, feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, channels)),
                                                    train=False, features=True), variables)
    hp = Hyper.from_config(s, num_classes=info.num_classes, total_steps=d.total,
                           compute_dtype=jnp.dtype(config.model.dtype))
    base = build.create_state(variables, tx, state_rng, mesh)
    memory = init_memory(alg, hp, params=base.params, batch_stats=base.batch_stats,
                         num_slots=num_slots, num_unlabeled=len(stream_u),
                         feature_dim=int(feats.shape[-1]))
    state = jax.device_put(create_ssl_state(base, memory, num_slots), sharding.replicated(mesh))
    strong_fn = None
    if s.strong_on_device:
        strong_fn = lambda rng, x: strong_augment(rng, x, cutout=s.cutout)
    step = make_ssl_step(model, tx, alg, hp, strong_fn=strong_fn,
                         unlabeled_labels=ssl_data.labels_by_index(unlabeled, num_slots))
    eval_step = steps.jit_eval_step(make_eval_step(
        model, compute_dtype=hp.compute_dtype, eval_ema=hp.eval_ema), mesh)
    on_error, workers = config.data.on_error, config.data.num_workers
    metrics_fn = (functools.partial(ema_and_student_metrics, class_names=info.class_names)
                  if hp.eval_ema else None)
    evaluator = Evaluator(eval_step, ds.splits, batch_size=tcfg.eval_batch_size,
                          preprocess=run_lib.eval_preprocess(config, info, seed), mesh=mesh,
                          multi_label=False, num_workers=workers, class_names=info.class_names,
                          metrics_fn=metrics_fn)
    weak_l = Preprocess(size, channels, s.weak_augment, seed + 2000, on_error)
    weak_u = Preprocess(size, channels, s.weak_augment, seed, on_error)
    strong = Preprocess(size, channels, "" if s.strong_on_device else s.strong_augment,
                        seed + 1000, on_error)

    def make_stream():
        if not alg.unlabeled:  # supervised-only: the labeled set alone, same B and steps
            epochs = run_lib.Durations(max(len(labeled) // b, 1), d.total).num_epochs
            ts = train_stream(labeled, global_batch=b, preprocess=weak_l, seed=seed,
                              num_epochs=epochs, num_workers=workers)
            return TrainStream(ts.dataset.map(_AsLabeled()), ts.steps_per_epoch, ts.num_epochs)
        return semi_supervised_stream(labeled, stream_u, global_batch=b, mu=s.mu,
                                      labeled_preprocess=weak_l, views=TwoViews(weak_u, strong),
                                      seed=seed, num_steps=d.total, num_workers=workers)

    return run_lib.Run(
        mesh, state, steps.jit_train_step(step, mesh), make_stream, evaluator,
        run_lib.loop_settings(tcfg, d), b, d, run_lib.run_meta(config, method=method, seed=seed),
        model=model, tx=tx, ds=ds, evaluator=evaluator, step=step,
        extras={"labeled": labeled, "unlabeled": unlabeled, "unlabeled_stream": stream_u,
                "hyper": hp, "algorithm": alg})


def run_one(method: str, seed: int, workdir: str, config, hooks=()) -> dict:
    """Train one algorithm with one seed in `workdir` (its sub-run config); returns flat final
    metrics, per-class recall by class name included."""
    start = time.time()
    run = build_ssl_run(config, method, seed)
    _, final = run_lib.fit(run, workdir, hooks=hooks)
    return _result(run, final, time.time() - start)


def run_group(method: str, seeds, workdirs, configs, group_dir: str) -> list[dict]:
    """The comparison's `run_group`: the seeds of one algorithm trained together
    (`train.seeds`; every state memory stacked per seed), each seed's result as `run_one`'s;
    `time/run_s` is the group's wall time divided by its seeds."""
    start = time.time()
    runs = [build_ssl_run(c, method, s) for c, s in zip(configs, seeds)]
    fitted = train_seeds.fit_each(runs, workdirs, group_dir, what=f"ssl {method}")
    per_seed = (time.time() - start) / len(runs)
    return [_result(r, final, per_seed) for r, (_, final) in zip(runs, fitted)]


def _result(run: run_lib.Run, final: dict, seconds: float) -> dict:
    """Flat final metrics of one seed, per-class recall by class name included."""
    result = {f"test/{k}": float(v) for k, v in final.items()}
    result["time/run_s"] = seconds
    result["data/num_labeled"] = float(len(run.extras["labeled"]))
    result["data/num_unlabeled"] = float(len(run.extras["unlabeled"]))
    log.info("%s seed %s: %s", run.meta.get("method"), run.meta.get("seed"),
             {k: round(v, 4) for k, v in result.items()})
    return result
