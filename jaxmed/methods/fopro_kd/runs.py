"""One (method, seed) run of the comparison on the kit's loop, and what it leaves for the report.

`build_method` makes the initial state, the teacher pytree and the jitted steps (one compile
per method); `run_one` trains (resuming from its checkpoints), evaluates on test and returns a
flat dict of metrics (`test/...`, per-class recall `test/recall/<c>`), and for FPG methods saves
the prompt (`prompt.npz`) the report draws.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import fourier, losses, metrics
from jaxmed.data import image_channels, image_size
from jaxmed.data.pipeline import Preprocess, train_stream
from jaxmed.methods.fopro_kd import objectives, trainer
from jaxmed.methods.fopro_kd.heads import ProjectorHeads
from jaxmed.train import build, sharding
from jaxmed.train.evaluate import Evaluator
from jaxmed.train.loop import LoopSettings, train_loop
from jaxmed.train.writers import MetricWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Built:
    setup: trainer.Setup
    state: trainer.KDState  # initial, replicated
    teacher: dict  # {'variables'[, 'probe']}, replicated; {} for student-only methods
    train_step: Any  # jitted (state, teacher, batch)
    eval_step: Any  # jitted (state, batch)
    steps_per_epoch: int
    total_steps: int
    teacher_dim: int  # the teacher's feature size (Teacher.feature_dim)


def evaluate_split(evaluator: Evaluator, state, split: str, groups) -> dict:
    """The comparison's metrics of one split: accuracy, balanced accuracy, macro F1, head /
    medium / tail accuracy and per-class recall."""
    out = evaluator.predict(state, split)
    probs, labels = out["probs"], np.asarray(out["label"], np.int64)
    pred = probs.argmax(-1)
    base = metrics.single_label_metrics(probs, labels)
    res = {"accuracy": base["accuracy"], "balanced_accuracy": base["balanced_accuracy"],
           "f1_macro": base["f1"], "auc": base["auc"], "loss": float(np.mean(out["loss"]))}
    res.update(metrics.group_accuracies(labels, pred, groups))
    recall = metrics.per_class_recall(labels, pred, probs.shape[-1])
    res.update({f"recall/{c}": float(r) for c, r in enumerate(recall)})
    return res


def _window(kd_cfg, size: int):
    beta = kd_cfg.fpg.beta
    return None if beta >= 1.0 else fourier.low_frequency_window(size, size, beta)


def build_method(config, method: str, seed: int, ds, teacher_model, mesh) -> Built:
    """State, teacher pytree and jitted steps of one method (teacher_model: a `Teacher` or
    None for student-only methods)."""
    info, kd, tcfg = ds.info, config.kd, config.train
    size, channels = image_size(config.data, info), image_channels(config.data, info)
    counts = np.asarray(info.class_counts, np.int64)
    if (counts == 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training "
                         "sample: the long-tailed losses need every class")
    spe = len(ds["train"]) // tcfg.batch_size
    if spe == 0:
        raise ValueError(f"config.train.batch_size={tcfg.batch_size} is larger than the "
                         f"{len(ds['train'])} training images of {info.name}")
    total = build.total_steps(tcfg, spe)
    model = build.build_model(config.model, info.num_classes)
    init_rng, heads_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    variables = build.init_variables(model, config.model, init_rng, (size, size, channels))
    params = {"backbone": variables["params"]}
    stats = {"backbone": variables.get("batch_stats", {})}
    needs_teacher = method not in trainer.STUDENT_ONLY
    if needs_teacher and teacher_model is None:
        raise ValueError(f"method {method!r} needs a teacher (config.kd.teacher)")
    heads = None
    if method in trainer.WITH_HEADS:
        heads = ProjectorHeads(teacher_model.feature_dim, info.num_classes,
                               hidden=kd.projector_hidden, dtype=jnp.dtype(config.model.dtype))
        feat = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, features=True)[1],
                              variables, jnp.zeros((1, size, size, channels)))
        hv = jax.device_get(dict(heads.init(heads_rng, jnp.zeros(feat.shape, jnp.float32))))
        params["heads"], stats["heads"] = hv["params"], hv["batch_stats"]
    tx = build.make_optimizer(tcfg, total)
    kd_weights = (np.asarray(losses.class_balanced_weights(counts, kd.cb_beta))
                  if kd.kd_class_weights else None)
    setup = trainer.Setup(
        method=method, model=model, heads=heads, tx=tx, class_counts=counts,
        compute_dtype=jnp.dtype(config.model.dtype),
        prompt_tx=optax.adam(kd.fpg.lr) if method == "ekd_fpg_adv" else None,
        teacher_model=teacher_model.model if needs_teacher else None,
        teacher_size=teacher_model.image_size if needs_teacher else 0,
        teacher_logits=("head" if needs_teacher and teacher_model.num_classes ==
                        info.num_classes else "probe"),
        window=_window(kd, size), w_kd=kd.w_kd, kd_class_weights=kd_weights,
        w_hinton=kd.w_hinton, temperature=kd.temperature, w_feature=kd.w_feature,
        ldam_max_margin=kd.ldam_max_margin, ldam_scale=kd.ldam_scale,
        drw_start=int(kd.drw_start * total), cb_beta=kd.cb_beta, focal_gamma=kd.focal_gamma,
        la_tau=kd.la_tau, fpg_penalty=kd.fpg.penalty)
    full = {"student": params}
    opt_state = {"student": tx.init(params)}
    if method in trainer.PROMPTED:
        full["prompt"] = fourier.init_prompt(size, size, channels)
        if method == "ekd_fpg_adv":
            opt_state["prompt"] = setup.prompt_tx.init(full["prompt"])
    state = trainer.KDState(step=jnp.zeros((), jnp.int32), params=full, batch_stats=stats,
                            opt_state=opt_state, rng=state_rng)
    teacher = {"variables": teacher_model.variables} if needs_teacher else {}
    rep = sharding.replicated(mesh)
    return Built(setup, jax.device_put(state, rep), jax.device_put(teacher, rep),
                 trainer.jit_train_step(setup, mesh), trainer.jit_eval_step(setup, mesh),
                 spe, total,
                 0 if teacher_model is None else teacher_model.feature_dim)


def fit_probe_stage(config, built: Built, ds, seed: int, mesh, learn_prompt: bool,
                    run_workdir: str) -> dict:
    """The discriminative FPG (prompt + probe) or a probe alone on the frozen teacher, for
    `config.kd.fpg.steps` steps; saved to run_workdir/fpg_stage.npz and read back on resume."""
    path = os.path.join(run_workdir, "fpg_stage.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            out = {"probe": {"kernel": z["kernel"], "bias": z["bias"]}}
            if "log_mask" in z:
                out["prompt"] = {"log_mask": z["log_mask"]}
        return out
    info, kd = ds.info, config.kd
    size, channels = image_size(config.data, info), image_channels(config.data, info)
    params = {"probe": objectives.init_probe(built.teacher_dim, info.num_classes)}
    if learn_prompt:
        params["prompt"] = fourier.init_prompt(size, size, channels)
    tx = optax.adam(kd.fpg.lr)
    pstate = jax.device_put({"params": params, "opt_state": tx.init(params)},
                            sharding.replicated(mesh))
    step = trainer.jit_probe_step(built.setup, tx, learn_prompt, mesh)
    bs = config.train.batch_size
    epochs = -(-kd.fpg.steps // max(len(ds["train"]) // bs, 1))
    stream = train_stream(ds["train"], global_batch=bs, preprocess=Preprocess(
        size, channels, config.data.train_augment, seed, config.data.on_error), seed=seed + 7919,
        num_epochs=max(epochs, 1), num_workers=config.data.num_workers)
    m = {}
    for _ in range(kd.fpg.steps):
        pstate, m = step(pstate, built.teacher, sharding.to_global(next(stream), mesh))
    out = jax.device_get(pstate["params"])
    log.info("FPG stage (%s): %s", "prompt + probe" if learn_prompt else "probe",
             {k: float(v) for k, v in jax.device_get(m).items()})
    flat = {"kernel": out["probe"]["kernel"], "bias": out["probe"]["bias"]}
    if learn_prompt:
        flat["log_mask"] = out["prompt"]["log_mask"]
    np.savez(path, **flat)
    return out


def run_one(config, method: str, seed: int, run_workdir: str, ds, teacher_model, mesh) -> dict:
    """Train and test one (method, seed); returns flat `test/...` metrics."""
    info = ds.info
    built = build_method(config, method, seed, ds, teacher_model, mesh)
    state, teacher = built.state, built.teacher
    if method == "ekd_fpg" or (method == "hinton_kd" and built.setup.teacher_logits == "probe"):
        stage = fit_probe_stage(config, built, ds, seed, mesh, method == "ekd_fpg", run_workdir)
        rep = sharding.replicated(mesh)
        teacher = {**teacher, "probe": jax.device_put(stage["probe"], rep)}  # no round trip
        if method == "ekd_fpg":
            params = dict(state.params)
            params["prompt"] = jax.device_put(stage["prompt"], rep)
            state = state.replace(params=params)
    size = image_size(config.data, info)
    channels = image_channels(config.data, info)
    groups = metrics.class_groups(info.class_counts, tuple(config.kd.group_boundaries))
    evaluator = Evaluator(built.eval_step, ds.splits, batch_size=config.train.eval_batch_size,
                          preprocess=Preprocess(size, channels, "", seed, config.data.on_error),
                          mesh=mesh, multi_label=False, num_workers=config.data.num_workers)
    tcfg = config.train
    epochs = max(tcfg.epochs, 1) if tcfg.steps <= 0 else -(-tcfg.steps // built.steps_per_epoch)
    train_pre = Preprocess(size, channels, config.data.train_augment, seed, config.data.on_error)

    def make_stream():
        return train_stream(ds["train"], global_batch=tcfg.batch_size, preprocess=train_pre,
                            seed=seed, num_epochs=epochs, num_workers=config.data.num_workers)

    step_fn = built.train_step
    writer = MetricWriter(run_workdir, enabled=sharding.is_lead_process())
    try:
        state, final = train_loop(
            workdir=run_workdir, settings=LoopSettings.from_config(tcfg), state=state,
            train_step=lambda s, b: step_fn(s, teacher, b), make_stream=make_stream,
            evaluate=lambda s, split: evaluate_split(evaluator, s, split, groups), mesh=mesh,
            writer=writer, meta={"config": json.loads(config.to_json()), "method": method,
                                 "seed": seed}, global_batch=tcfg.batch_size)
    finally:
        writer.close()
    if "prompt" in state.params and sharding.is_lead_process():
        np.savez(os.path.join(run_workdir, "prompt.npz"),
                 **jax.device_get(state.params["prompt"]))
    return {f"test/{k}": v for k, v in final.items()}
