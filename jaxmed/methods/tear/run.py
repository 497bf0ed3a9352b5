"""One semi-supervised (algorithm, seed) run on the kit: the labeled / unlabeled split, the
two-view stream, the state with the algorithm's memories, the jitted step (`build_ssl_run`),
and the comparison's `run_one`.

An epoch is one pass over the unlabeled set (mu B images per step), so `train.epochs` and the
eval / checkpoint cadences' 'once per epoch' (0) count in those passes; supervised-only trains
the same number of steps of B labeled images.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp

from jaxmed import data as data_lib
from jaxmed.data.pipeline import Preprocess, TrainStream, TwoViews, semi_supervised_stream, \
    train_stream
from jaxmed.data.sources import record_indices
from jaxmed.methods.tear import algorithms
from jaxmed.methods.tear import data as ssl_data
from jaxmed.methods.tear.device_augment import strong_augment
from jaxmed.methods.tear.step import Hyper, create_ssl_state, init_memory, make_ssl_step
from jaxmed.train import build, run as run_lib, sharding, steps
from jaxmed.train.evaluate import Evaluator

log = logging.getLogger(__name__)


class _AsLabeled:
    def __call__(self, batch):
        return {"labeled": batch}


def split(config, ds):
    """(labeled, unlabeled) sources of `config.ssl` (a stratified subset, or the list files)."""
    s = config.ssl
    if s.num_labeled > 0:
        return ssl_data.from_num_labeled(ds["train"], s.num_labeled, s.split_seed)
    return ssl_data.from_lists(s.labeled_list, s.unlabeled_list, config.data.root,
                               ds.info.num_classes,
                               held_out={k: v for k, v in ds.splits.items() if k != "train"})


def build_ssl_run(config, method: str, seed: int | None = None) -> run_lib.Run:
    """The kit `Run` of one algorithm (seed: init and data order; default config.seed);
    `run.extras` holds labeled, unlabeled, hyper and algorithm."""
    alg = algorithms.get(method)
    seed = config.seed if seed is None else int(seed)
    s, tcfg = config.ssl, config.train
    mesh = sharding.make_mesh()
    sharding.check_global_batch(tcfg.batch_size, mesh)
    ds = data_lib.build(config.data)
    info = ds.info
    if info.multi_label:
        raise ValueError(f"{info.name}: semi-supervised methods need single-label data")
    labeled, unlabeled = split(config, ds)
    num_slots = int(max(record_indices(labeled).max(), record_indices(unlabeled).max())) + 1
    b = tcfg.batch_size
    d = run_lib.durations(tcfg, max(len(unlabeled) // (s.mu * b), 1))
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
                         num_slots=num_slots, num_unlabeled=len(unlabeled),
                         feature_dim=int(feats.shape[-1]))
    state = jax.device_put(create_ssl_state(base, memory, num_slots), sharding.replicated(mesh))
    strong_fn = None
    if s.strong_on_device:
        strong_fn = lambda rng, x: strong_augment(rng, x, cutout=s.cutout)  # noqa: E731
    step = make_ssl_step(model, tx, alg, hp, strong_fn=strong_fn,
                         unlabeled_labels=ssl_data.labels_by_index(unlabeled, num_slots))
    eval_step = steps.jit_eval_step(steps.make_eval_step(
        model, multi_label=False, compute_dtype=hp.compute_dtype), mesh)
    on_error, workers = config.data.on_error, config.data.num_workers
    evaluator = Evaluator(eval_step, ds.splits, batch_size=tcfg.eval_batch_size,
                          preprocess=run_lib.eval_preprocess(config, info, seed), mesh=mesh,
                          multi_label=False, num_workers=workers, class_names=info.class_names)
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
        return semi_supervised_stream(labeled, unlabeled, global_batch=b, mu=s.mu,
                                      labeled_preprocess=weak_l, views=TwoViews(weak_u, strong),
                                      seed=seed, num_steps=d.total, num_workers=workers)

    return run_lib.Run(
        mesh, state, steps.jit_train_step(step, mesh), make_stream, evaluator,
        run_lib.loop_settings(tcfg, d), b, d, run_lib.run_meta(config, method=method),
        model=model, tx=tx, ds=ds, evaluator=evaluator,
        extras={"labeled": labeled, "unlabeled": unlabeled, "hyper": hp, "algorithm": alg})


def run_one(method: str, seed: int, workdir: str, config, hooks=()) -> dict:
    """Train one algorithm with one seed in `workdir` (its sub-run config); returns flat final
    metrics, per-class recall by class name included."""
    start = time.time()
    run = build_ssl_run(config, method, seed)
    _, final = run_lib.fit(run, workdir, hooks=hooks)
    result = {f"test/{k}": float(v) for k, v in final.items()}  # recall/<class name> included
    result["time/run_s"] = time.time() - start
    result["data/num_labeled"] = float(len(run.extras["labeled"]))
    result["data/num_unlabeled"] = float(len(run.extras["unlabeled"]))
    log.info("%s seed %d: %s", method, seed, {k: round(v, 4) for k, v in result.items()})
    return result
