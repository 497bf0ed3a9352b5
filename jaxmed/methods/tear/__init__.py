"""TEAR (MICCAI 2022) and the semi-supervised family it is compared with, on one jitted step.

The pieces are USB's hooks (pseudo-labelling, masking, distribution alignment, weighting) as
small pure jnp functions over `flax.struct.dataclass` states: `pseudo_labels` (hard / soft /
sharpened labels, the 32-batch DA queue, SoftMatch's uniform alignment), `thresholds`
(FixMatch, FlexMatch, FreeMatch masks, SoftMatch weights), `teacher` (EMA teacher), `adapl`
(adaptive soft pseudo labels), `prototypes` (k-means + IPH loss). `algorithms` composes them
per algorithm, `step` is the one jitted step, `data` the labeled / unlabeled split, `report`
the comparison. Spec: ../shared/specs/tear.md.

TEAR = FixMatch + DA + AdaPL + IPH. AdaPL decision (adapl.py): eps = sigmoid(gamma d) - 0.5
(`config.ssl.adapl_form='rising'`, default), because the spec's literal eps = 1 - sigmoid(gamma
d) ('spec') contradicts its own "larger estimated loss, softer label".

`config.ssl.methods` x `config.ssl.seeds` runs every algorithm on the same labeled split
(`ssl.split_seed`), each in workdir/runs/<method>/seed_<s>/ with its own checkpoints (resume),
then writes workdir/report/ (comparison.csv, summary.md, figures).
"""

from __future__ import annotations

import json
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmed import data as data_lib
from jaxmed import metrics
from jaxmed.data.pipeline import Preprocess, TrainStream, TwoViews, semi_supervised_stream, \
    train_stream
from jaxmed.methods import supervised
from jaxmed.methods.tear import algorithms, report
from jaxmed.methods.tear import data as ssl_data
from jaxmed.methods.tear.adapl import DISTANCES
from jaxmed.methods.tear.device_augment import strong_augment
from jaxmed.methods.tear.step import Hyper, SSLState, create_ssl_state, init_memory, \
    make_ssl_step
from jaxmed.train import build, comparison, sharding, steps
from jaxmed.train.evaluate import Evaluator
from jaxmed.train.loop import LoopSettings, train_loop
from jaxmed.train.workdir import write_config
from jaxmed.train.writers import MetricWriter

log = logging.getLogger(__name__)

HARMLESS_KEYS = ("ssl.methods", "ssl.seeds", "train.progress", "train.log_every",
                 "data.num_workers")
METRICS = ("test/auc", "test/accuracy", "test/balanced_accuracy", "test/f1",
           "test/sensitivity", "test/specificity")

__all__ = ["default_config", "check_config", "train_and_evaluate", "build_ssl_run",
           "SSLState", "make_ssl_step", "Hyper", "algorithms", "HARMLESS_KEYS", "METRICS"]


def default_config() -> ml_collections.ConfigDict:
    """Every key the TEAR / semi-supervised trainer reads (the supervised keys + `ssl`)."""
    c = supervised.default_config()
    c.method = "tear"
    c.train.schedule = "fixmatch_cosine"  # lr cos(7 pi k / 16 K) (FixMatch / TEAR reference)
    c.ssl = ml_collections.ConfigDict(dict(
        methods=("supervised", "fixmatch", "tear"), seeds=(0, 1, 2),
        num_labeled=0,  # > 0: stratified labeled subset of the train split; else the lists
        labeled_list="", unlabeled_list="",  # TEAR's TrainN.txt / Train_unlN.txt
        split_seed=0,  # the labeled subset (shared by every method and seed)
        mu=7,  # unlabeled images per labeled one
        weak_augment="rotate(10)|translate(4)|flip",  # spec: rotation 10 deg, translation
        strong_augment="translate(4)|flip|randaugment(2,10)|cutout(16)",
        strong_on_device=False,  # True: the strong view's augmentation runs in the step
        cutout=16,  # device strong view's cutout size
        ema_p=0.999,  # FreeMatch / SoftMatch EMAs (USB)
        teacher_momentum=0.999,  # EMA teacher (spec)
        da_length=32,
        adapl_weight=0.1, adapl_distance="kl", adapl_gamma=2.0, adapl_form="rising",
        adapl_entropy=False, adapl_memory=True, adapl_memory_momentum=0.9,
        iph_weight=0.1, iph_iters=3,
    ))
    return c


def check_config(config) -> None:
    """Errors naming the key, before anything runs."""
    s = config.ssl
    comparison.check_methods_and_seeds(s.methods, s.seeds, algorithms.NAMES, "ssl")
    lists = bool(s.labeled_list) + bool(s.unlabeled_list)
    if lists == 1:
        raise ValueError("config.ssl.labeled_list and config.ssl.unlabeled_list go together")
    if (s.num_labeled > 0) == (lists == 2):
        raise ValueError("set either config.ssl.num_labeled > 0 or config.ssl.labeled_list / "
                         "unlabeled_list (exactly one)")
    if s.mu < 1:
        raise ValueError(f"config.ssl.mu={s.mu} must be >= 1")
    if s.adapl_distance not in DISTANCES:
        raise ValueError(f"config.ssl.adapl_distance={s.adapl_distance!r}: one of {DISTANCES}")
    if s.adapl_form not in ("rising", "spec"):
        raise ValueError(f"config.ssl.adapl_form={s.adapl_form!r}: 'rising' or 'spec'")
    for key in ("ema_p", "teacher_momentum", "adapl_memory_momentum"):
        if not 0.0 <= s[key] < 1.0:
            raise ValueError(f"config.ssl.{key}={s[key]} must be in [0, 1)")
    if config.data.name == "synthetic" and config.data.synthetic.multi_label:
        raise ValueError("config.data.synthetic.multi_label: semi-supervised methods need "
                         "single-label data")
    if config.pruning.criterion != "none":
        raise ValueError("config.pruning.criterion: the semi-supervised trainer trains dense")


class _AsLabeled:
    def __call__(self, batch):
        return {"labeled": batch}


def build_ssl_run(config, method: str):
    """Everything one (method, seed) run needs: a dict (mesh, ds, labeled, unlabeled, model,
    state, train_step, eval_step, evaluator, make_stream, total, hyper, algorithm)."""
    alg = algorithms.get(method)
    s, tcfg = config.ssl, config.train
    mesh = sharding.make_mesh()
    sharding.check_global_batch(tcfg.batch_size, mesh)
    ds = data_lib.build(config.data)
    info = ds.info
    if info.multi_label:
        raise ValueError(f"{info.name}: semi-supervised methods need single-label data")
    if s.num_labeled > 0:
        labeled, unlabeled = ssl_data.from_num_labeled(ds["train"], s.num_labeled, s.split_seed)
    else:
        labeled, unlabeled = ssl_data.from_lists(
            s.labeled_list, s.unlabeled_list, config.data.root, info.num_classes,
            held_out={k: v for k, v in ds.splits.items() if k != "train"})
    idx_l, idx_u = ssl_data.record_indices(labeled), ssl_data.record_indices(unlabeled)
    num_slots = int(max(idx_l.max(), idx_u.max())) + 1
    b = tcfg.batch_size
    if tcfg.steps > 0:
        total = tcfg.steps
    else:  # an epoch: one pass over the unlabeled set (mu B per step)
        total = max(tcfg.epochs, 1) * max(len(unlabeled) // (s.mu * b), 1)
    size = data_lib.image_size(config.data, info)
    channels = data_lib.image_channels(config.data, info)
    model = build.build_model(config.model, info.num_classes)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    tx = build.make_optimizer(tcfg, total, decay_mask=build.kernels_only)  # spec: kernels only
    variables = build.init_variables(model, config.model, init_rng, (size, size, channels))
    _, feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, channels)),
                                                    train=False, features=True), variables)
    hp = Hyper(num_classes=info.num_classes, total_steps=total, ema_p=s.ema_p,
               teacher_momentum=s.teacher_momentum, da_length=s.da_length,
               adapl_weight=s.adapl_weight, adapl_distance=s.adapl_distance,
               adapl_gamma=s.adapl_gamma, adapl_form=s.adapl_form,
               adapl_entropy=s.adapl_entropy, adapl_memory=s.adapl_memory,
               adapl_memory_momentum=s.adapl_memory_momentum, iph_weight=s.iph_weight,
               iph_iters=s.iph_iters, compute_dtype=jnp.dtype(config.model.dtype))
    base = build.create_state(variables, tx, state_rng, mesh)
    memory = init_memory(alg, hp, params=base.params, batch_stats=base.batch_stats,
                         num_slots=num_slots, num_unlabeled=len(unlabeled),
                         feature_dim=int(feats.shape[-1]))
    state = jax.device_put(create_ssl_state(base, memory), sharding.replicated(mesh))
    strong_fn = None
    if s.strong_on_device:
        strong_fn = lambda rng, x: strong_augment(rng, x, cutout=s.cutout)  # noqa: E731
    step = make_ssl_step(model, tx, alg, hp, strong_fn=strong_fn,
                         unlabeled_labels=ssl_data.labels_by_index(unlabeled, num_slots))
    train_step = steps.jit_train_step(step, mesh)
    eval_step = steps.jit_eval_step(steps.make_eval_step(
        model, multi_label=False, compute_dtype=hp.compute_dtype), mesh)
    seed, on_error, workers = config.seed, config.data.on_error, config.data.num_workers
    evaluator = Evaluator(eval_step, ds.splits, batch_size=tcfg.eval_batch_size,
                          preprocess=Preprocess(size, channels, "", seed, on_error), mesh=mesh,
                          multi_label=False, num_workers=workers)
    weak_l = Preprocess(size, channels, s.weak_augment, seed + 2000, on_error)
    weak_u = Preprocess(size, channels, s.weak_augment, seed, on_error)
    strong = Preprocess(size, channels, "" if s.strong_on_device else s.strong_augment,
                        seed + 1000, on_error)

    def make_stream():
        if not alg.unlabeled:  # supervised-only: the labeled set alone, same B and steps
            spe = len(labeled) // b
            ts = train_stream(labeled, global_batch=b, preprocess=weak_l, seed=seed,
                              num_epochs=-(-total // max(spe, 1)), num_workers=workers)
            return TrainStream(ts.dataset.map(_AsLabeled()), ts.steps_per_epoch, ts.num_epochs)
        return semi_supervised_stream(labeled, unlabeled, global_batch=b, mu=s.mu,
                                      labeled_preprocess=weak_l, views=TwoViews(weak_u, strong),
                                      seed=seed, num_steps=total, num_workers=workers)

    return dict(mesh=mesh, ds=ds, labeled=labeled, unlabeled=unlabeled, model=model,
                state=state, train_step=train_step, eval_step=eval_step, evaluator=evaluator,
                make_stream=make_stream, total=total, hyper=hp, algorithm=alg)


def loop_settings(train_cfg, total: int) -> LoopSettings:
    """The loop settings of an SSL run of `total` steps. 'Once per epoch' means different
    things for the labeled-only and the SSL streams: by default every algorithm evaluates and
    checkpoints every tenth of training instead."""
    settings = LoopSettings.from_config(train_cfg)
    settings.steps = total
    if settings.eval_every == 0:
        settings.eval_every = max(total // 10, 1)
    if settings.checkpoint_every == 0:
        settings.checkpoint_every = max(settings.eval_every, 1)
    return settings


def run_one(config, method: str, seed: int, workdir: str, hooks=()) -> dict:
    """Train one algorithm with one seed in `workdir`; returns flat final metrics."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.seed = int(seed)
    config.ssl.methods, config.ssl.seeds = (method,), (int(seed),)
    write_config(config, workdir, harmless=HARMLESS_KEYS)
    start = time.time()
    run = build_ssl_run(config, method)
    settings = loop_settings(config.train, run["total"])
    evaluator, kept = run["evaluator"], {}

    def evaluate(state, split):  # keeps the final test pass's outputs (per-class recall)
        out = kept[split] = evaluator.predict(state, split)
        return evaluator.metrics_of(out)

    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())
    try:
        state, final = train_loop(
            workdir=workdir, settings=settings, state=run["state"],
            train_step=run["train_step"], make_stream=run["make_stream"],
            evaluate=evaluate, mesh=run["mesh"], writer=writer,
            meta={"config": json.loads(config.to_json()), "method": method},
            hooks=hooks, global_batch=config.train.batch_size)
    finally:
        writer.close()
    result = {f"test/{k}": float(v) for k, v in final.items()}
    out = kept["test"]
    recall = metrics.per_class_recall(np.asarray(out["label"]),
                                      np.asarray(out["probs"]).argmax(-1),
                                      run["ds"].info.num_classes)
    for name, r in zip(run["ds"].info.class_names, recall):
        result[f"test/recall/{name}"] = float(r)
    result["time/run_s"] = time.time() - start
    result["data/num_labeled"] = float(len(run["labeled"]))
    result["data/num_unlabeled"] = float(len(run["unlabeled"]))
    log.info("%s seed %d: %s", method, seed, {k: round(v, 4) for k, v in result.items()})
    return result


def train_and_evaluate(config, workdir: str) -> dict:
    """Every method x seed of config.ssl, then workdir/report/; returns the mean test metrics
    per method ({'<method>/test/auc': ...})."""
    check_config(config)
    write_config(config, workdir, harmless=HARMLESS_KEYS)
    s = config.ssl
    results = comparison.run_all(workdir, s.methods, s.seeds,
                                 lambda m, seed, d: run_one(config, m, seed, d))
    summary = report.write_report(workdir, config, results, METRICS)
    return {f"{m}/{k}": v for m, row in summary.items() for k, v in row.items()
            if k in METRICS}
