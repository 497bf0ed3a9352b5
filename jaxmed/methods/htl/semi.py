"""HTL among unlabeled samples, on TEAR's semi-supervised step (`config.htl.task =
'semi_supervised'`).

The run is TEAR's (`jaxmed.methods.tear.build_ssl_run`: the labeled / unlabeled split of
`config.ssl`, the two-view stream, `make_ssl_step` for `htl.ssl_algorithm`); HTL adds only the
identification hook. Every `htl.every_epochs` epochs (an epoch: one pass over the unlabeled set,
mu B images per step, as TEAR counts it) the current model and its pruned copies predict the
UNLABELED set (eval mode, no augmentation, sharded as `driver.identify`); a sample is hard when
the dense pseudo label (its top-1) is not the pruned copies' majority vote (the classification
rule of `identify.py`). Attention 'weight' sets `state.ssl.weights[index]` = `htl.weight` on
that set and 1 elsewhere until the next identification: the step multiplies every unlabeled
loss term by it (masks, pseudo labels and memories unchanged). Labeled samples are never
identified and keep weight 1.

Decisions: oversampling ('htl_oversample') is refused: TEAR's unlabeled stream has no sampling
weights. Evaluation uses HTL's own evaluator (AUC / balanced accuracy overall and per
sub-population the data marks), not TEAR's, so the report has the group columns. The eval /
checkpoint cadences' default (0) is TEAR's: a tenth of training.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmed.data.pipeline import eval_batches
from jaxmed.methods import tear
from jaxmed.methods.htl import driver, trainer
from jaxmed.methods.tear import algorithms
from jaxmed.methods.tear import data as ssl_data
from jaxmed.train import sharding, steps
from jaxmed.train.loop import train_loop
from jaxmed.train.writers import MetricWriter


def tear_config(config, seed: int | None = None) -> ml_collections.ConfigDict:
    """The HTL config as TEAR reads it: its `ssl` block with methods = (htl.ssl_algorithm,)
    and seeds = htl.seeds; config.seed = `seed` (init and data order of one run)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.ssl.methods = (config.htl.ssl_algorithm,)
    c.ssl.seeds = tuple(config.htl.seeds)
    if seed is not None:
        c.seed = int(seed)
    return c


def check_config(config) -> None:
    """semi_supervised's keys, naming the one at fault (TEAR checks its `ssl` block)."""
    h = config.htl
    if "ssl" not in config:
        raise ValueError("htl.task='semi_supervised' needs the config.ssl block (TEAR's keys; "
                         "jaxmed.methods.htl.default_config() has it)")
    try:
        alg = algorithms.get(h.ssl_algorithm)
    except ValueError as e:
        raise ValueError(f"config.htl.ssl_algorithm={h.ssl_algorithm!r}: {e}") from None
    if not alg.unlabeled:
        raise ValueError(f"config.htl.ssl_algorithm={h.ssl_algorithm!r} trains on labeled "
                         "images alone: HTL among unlabeled samples needs an algorithm that "
                         "uses them (e.g. 'fixmatch', 'tear')")
    if "htl_oversample" in h.methods:
        raise ValueError("config.htl.methods: 'htl_oversample' is not supported with "
                         "htl.task='semi_supervised' (TEAR's unlabeled stream has no sampling "
                         "weights); use 'baseline' and 'htl_weight'")
    tear.check_config(tear_config(config))


def run_one(config, method: str, seed: int, workdir: str, *, attention: str | None) -> dict:
    """Train and test one (method, seed) with the TEAR step; flat final metrics ('test/...')."""
    h, tcfg = config.htl, config.train
    cfg = tear_config(config, seed)
    run = tear.build_ssl_run(cfg, h.ssl_algorithm)
    mesh, model, unlabeled = run["mesh"], run["model"], run["unlabeled"]
    total, dtype = run["total"], run["hyper"].compute_dtype
    ev = run["evaluator"]  # TEAR's: its batches and preprocessing serve identification too
    eval_pre = ev.preprocess
    evaluate = trainer.SplitEvaluator(
        steps.jit_eval_step(trainer.make_classification_predict(model, compute_dtype=dtype),
                            mesh), ev.batches, mesh, "classification")
    settings = tear.loop_settings(tcfg, total)
    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())
    sparsities = tuple(float(s) for s in h.sparsities)
    positions = ssl_data.record_indices(unlabeled)
    hooks, hook = [], None
    if attention is not None:
        ident_bs = h.identify_batch_size or tcfg.eval_batch_size
        sharding.check_global_batch(ident_bs, mesh, key="eval_batch_size")
        steps_per_epoch = max(len(unlabeled) // (cfg.ssl.mu * tcfg.batch_size), 1)
        hook = driver.HtlHook(
            driver.make_identify_fn(model, task="classification", level_axis=h.level_axis,
                                    mesh=mesh, compute_dtype=dtype),
            lambda: eval_batches(unlabeled, global_batch=ident_bs, preprocess=eval_pre,
                                 num_workers=ev.num_workers),
            mesh, sparsities, every=h.every_epochs * steps_per_epoch, total=total,
            attention=attention, weight=float(h.weight), top_q=h.top_q or None,
            positions=positions, stream=lambda: None, writer=writer, workdir=workdir,
            table="ssl.weights")
        hooks.append(hook)
    try:
        state, final = train_loop(
            workdir=workdir, settings=settings, state=run["state"],
            train_step=run["train_step"], make_stream=run["make_stream"], evaluate=evaluate,
            mesh=mesh, writer=writer,
            meta={"config": json.loads(cfg.to_json()), "method": method, "seed": seed},
            state_hooks=hooks, global_batch=tcfg.batch_size)
    finally:
        writer.close()
    result = {f"test/{k}": v for k, v in final.items()}
    result["data/num_labeled"] = float(len(run["labeled"]))
    result["data/num_unlabeled"] = float(len(unlabeled))
    if hook is not None:
        result["identify_seconds"] = float(np.mean(hook.seconds)) if hook.seconds else 0.0
        driver.save_last_examples(
            workdir, driver.make_examples_fn(model, task="classification",
                                             compute_dtype=jnp.dtype(dtype)),
            state, sparsities, unlabeled, positions, eval_pre, h.grid)
    return result
