"""One (method, seed) run of the comparison on the kit (`jaxmed.train.run.fit`), and what it
leaves for the report.

`build_method` makes the initial state, the teacher pytree and the jitted steps (one compile
per method); `run_one` (the comparison's) trains (resuming from its checkpoints), evaluates on
test and returns a flat dict of metrics (`test/...`, per-class recall `test/recall/<class
name>`), and for FPG methods saves the prompt (`prompt.npz`) the report draws. Files written
here are written atomically (`save_npz`) and checked when read back (`read_npz`: an error names
the file and what deleting it does); the probe / prompt stage stops on a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxmed import fourier, losses, metrics
from jaxmed.config_check import InputError
from jaxmed.data import image_channels, image_size
from jaxmed.data.pipeline import Preprocess, train_stream
from jaxmed.methods.fopro_kd import objectives, step
from jaxmed.methods.fopro_kd.heads import ProjectorHeads
from jaxmed.train import build, sharding
from jaxmed.train import seeds as train_seeds
from jaxmed.train.evaluate import Evaluator
from jaxmed.train.loop import NonFiniteLossError
from jaxmed.train.run import (
    Durations,
    Run,
    durations,
    eval_preprocess,
    fit,
    loop_settings,
    run_meta,
    steps_per_epoch,
    stream_factory,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class MethodSteps:
    """One method's jitted steps, the static `Setup` they close over, and the replicated state
    and teacher pytree they start from."""

    setup: step.Setup
    state: step.KDState  # initial, replicated
    teacher: dict  # {'variables'[, 'probe']}, replicated; {} for student-only methods
    train_step: Any  # jitted (state, teacher, batch)
    eval_step: Any  # jitted (state, batch)
    durations: Durations
    teacher_dim: int  # the teacher's feature size (Teacher.feature_dim)


def long_tailed_metrics(out: dict, groups, class_names) -> dict:
    """The comparison's metrics of one split (the evaluator's `metrics_fn`): accuracy, balanced
    accuracy, macro F1, head / medium / tail accuracy and per-class recall
    (`recall/<class name>`)."""
    probs, labels = out["probs"], np.asarray(out["label"], np.int64)
    pred = probs.argmax(-1)
    base = metrics.single_label_metrics(probs, labels)
    res = {"accuracy": base["accuracy"], "balanced_accuracy": base["balanced_accuracy"],
           "f1_macro": base["f1"], "auc": base["auc"], "loss": float(np.mean(out["loss"]))}
    res.update(metrics.group_accuracies(labels, pred, groups))
    recall = metrics.per_class_recall(labels, pred, probs.shape[-1])
    res.update({f"recall/{name}": float(r) for name, r in zip(class_names, recall)})
    return res


def _window(kd_cfg, size: int):
    beta = kd_cfg.fpg.beta
    return None if beta >= 1.0 else fourier.low_frequency_window(size, size, beta)


def build_method(config, method: str, seed: int, ds, teacher_model, mesh) -> MethodSteps:
    """State, teacher pytree and jitted steps of one method (teacher_model: a `Teacher` or
    None for student-only methods)."""
    info, kd, tcfg = ds.info, config.kd, config.train
    size, channels = image_size(config.data, info), image_channels(config.data, info)
    counts = np.asarray(info.class_counts, np.int64)
    if (counts == 0).any():
        raise InputError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training "
                         "sample: the long-tailed losses need every class")
    d = durations(tcfg, steps_per_epoch(len(ds["train"]), tcfg.batch_size,
                                        f"training images of {info.name}"))
    model = build.build_model(config.model, info.num_classes)
    init_rng, heads_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    variables = build.init_variables(model, config.model, init_rng, (size, size, channels))
    params = {"backbone": variables["params"]}
    stats = {"backbone": variables.get("batch_stats", {})}
    needs_teacher = method not in step.STUDENT_ONLY
    if needs_teacher and teacher_model is None:
        raise InputError(f"method {method!r} needs a teacher (config.kd.teacher)")
    heads = None
    if method in step.WITH_HEADS:
        heads = ProjectorHeads(teacher_model.feature_dim, info.num_classes,
                               hidden=kd.projector_hidden, dtype=jnp.dtype(config.model.dtype))
        feat = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, features=True)[1],
                              variables, jnp.zeros((1, size, size, channels)))
        hv = jax.device_get(dict(heads.init(heads_rng, jnp.zeros(feat.shape, jnp.float32))))
        params["heads"], stats["heads"] = hv["params"], hv["batch_stats"]
    tx = build.make_optimizer(tcfg, d.total)
    setup = step.Setup.from_config(
        kd, method=method, model=model, heads=heads, tx=tx, class_counts=counts,
        compute_dtype=jnp.dtype(config.model.dtype),
        prompt_tx=optax.adam(kd.fpg.lr) if method == "ekd_fpg_adv" else None,
        teacher_net=teacher_model.model if needs_teacher else None,
        teacher_size=teacher_model.image_size if needs_teacher else 0,
        teacher_logits=("head" if needs_teacher and teacher_model.num_classes ==
                        info.num_classes else "probe"),
        window=_window(kd, size), fpg_penalty=kd.fpg.penalty,
        kd_class_weights=(np.asarray(losses.class_balanced_weights(counts, kd.cb_beta))
                          if kd.kd_class_weights else None),
        drw_start=step.drw_start_step(d, kd.drw_start), durations=d)
    full = {"student": params}
    opt_state = {"student": tx.init(params)}
    if method in step.PROMPTED:
        full["prompt"] = fourier.init_prompt(size, size, channels)
        if method == "ekd_fpg_adv":
            opt_state["prompt"] = setup.prompt_tx.init(full["prompt"])
    state = step.KDState(step=jnp.zeros((), jnp.int32), params=full, batch_stats=stats,
                         opt_state=opt_state, rng=state_rng)
    teacher = {"variables": teacher_model.variables} if needs_teacher else {}
    rep = sharding.replicated(mesh)
    return MethodSteps(setup, jax.device_put(state, rep), jax.device_put(teacher, rep),
                       step.jit_train_step(setup, mesh), step.jit_eval_step(setup, mesh), d,
                       0 if teacher_model is None else teacher_model.feature_dim)


STAGE = "fpg_stage.npz"
NAN_CHECK_EVERY = 50  # probe-stage steps between fetches of their losses


def save_npz(path: str, arrays: dict) -> None:
    """np.savez, atomically: a kill leaves the old file or none, never half of one."""
    tmp = f"{path}.tmp{jax.process_index()}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_npz(path: str, want: dict, redo: str) -> dict:
    """The arrays `want` ({name: shape}) of a file this package wrote, checked: unreadable,
    missing, misshapen or non-finite is an error naming the file and saying `redo` (what
    deleting it does)."""
    try:
        with np.load(path) as z:
            got = {k: np.asarray(z[k]) for k in want if k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} is unreadable ({type(e).__name__}: {e}): delete it {redo}"
                         ) from None
    for k, shape in want.items():
        if k not in got:
            raise InputError(f"{path} has no array {k!r}: delete it {redo}")
        if tuple(got[k].shape) != tuple(shape):
            raise InputError(f"{path}: {k} has shape {tuple(got[k].shape)}, not {tuple(shape)} "
                             f"(written for another teacher or data?): delete it {redo}")
        if not np.isfinite(got[k]).all():
            raise InputError(f"{path} holds non-finite values ({k}): delete it {redo}")
    return got


def _stage_name(learn_prompt: bool) -> str:
    return ("Fourier-prompt stage (prompt + probe)" if learn_prompt
            else "probe stage (the teacher's logits for logit KD)")


def fit_probe_stage(config, built: MethodSteps, ds, seed: int, mesh, learn_prompt: bool,
                    run_workdir: str) -> dict:
    """The discriminative FPG (prompt + probe) or a probe alone on the frozen teacher, for
    `config.kd.fpg.steps` steps; saved to run_workdir/fpg_stage.npz (atomically) and read back
    (checked) on resume. A non-finite loss or result stops it naming the stage, the step and
    the file, with nothing saved. (A fixed number of steps with nothing to select or evaluate:
    a plain loop, not a `fit`.)"""
    path = os.path.join(run_workdir, STAGE)
    info, kd = ds.info, config.kd
    size, channels = image_size(config.data, info), image_channels(config.data, info)
    what = _stage_name(learn_prompt)
    params = {"probe": objectives.init_probe(built.teacher_dim, info.num_classes)}
    if learn_prompt:
        params["prompt"] = fourier.init_prompt(size, size, channels)
    if os.path.exists(path):
        want = {"kernel": params["probe"]["kernel"].shape, "bias": params["probe"]["bias"].shape}
        if learn_prompt:
            want["log_mask"] = params["prompt"]["log_mask"].shape
        z = read_npz(path, want, f"to redo the {what}")
        out = {"probe": {"kernel": z["kernel"], "bias": z["bias"]}}
        if learn_prompt:
            out["prompt"] = {"log_mask": z["log_mask"]}
        return out
    tx = optax.adam(kd.fpg.lr)
    pstate = jax.device_put({"params": params, "opt_state": tx.init(params)},
                            sharding.replicated(mesh))
    probe_step = step.jit_probe_step(built.setup, tx, learn_prompt, mesh)
    d = Durations(built.durations.steps_per_epoch, kd.fpg.steps)
    pre = Preprocess(size, channels, config.data.train_augment, seed, config.data.on_error)
    stream = train_stream(ds["train"], global_batch=config.train.batch_size, preprocess=pre,
                          seed=seed + 7919, num_epochs=d.num_epochs,
                          num_workers=config.data.num_workers)
    m, pending = {}, []

    def stop(why: str):
        raise NonFiniteLossError(f"{what} of {run_workdir}: {why} of {d.total}; nothing saved "
                                 f"to {path} (a smaller config.kd.fpg.lr={kd.fpg.lr} may help)")

    def check(upto: int):  # the losses of steps upto - len(pending) + 1 .. upto
        values = np.asarray(jax.device_get(pending), np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            stop(f"non-finite loss {values[bad[0]]} at step {upto - len(values) + bad[0] + 1}")
        pending.clear()

    for k in range(d.total):
        pstate, m = probe_step(pstate, built.teacher, sharding.to_global(next(stream), mesh))
        pending.append(m["loss"])
        if len(pending) >= NAN_CHECK_EVERY:
            check(k + 1)
    check(d.total)
    out = jax.device_get(pstate["params"])
    bad = [k for k, v in traverse_util.flatten_dict(out, sep="/").items()
           if not np.isfinite(v).all()]
    if bad:
        stop(f"non-finite {bad} at step {d.total}")
    log.info("%s: %s", what, {k: float(v) for k, v in jax.device_get(m).items()})
    flat = {"kernel": out["probe"]["kernel"], "bias": out["probe"]["bias"]}
    if learn_prompt:
        flat["log_mask"] = out["prompt"]["log_mask"]
    save_npz(path, flat)
    return out


def build_student_run(method: str, seed: int, run_workdir: str, config, *, ds, teacher_model,
                      mesh) -> Run:
    """The kit `Run` of one (method, seed) under its sub-config, its FPG / probe stage trained
    first where the method has one. `step_args`: the frozen teacher's variables (one object
    for every seed: the seed axis shares it) and the seed's own probe (stacked)."""
    info, tcfg = ds.info, config.train
    built = build_method(config, method, seed, ds, teacher_model, mesh)
    state, teacher = built.state, built.teacher
    probe = None
    if method == "ekd_fpg" or (method in step.LOGIT_KD and built.setup.teacher_logits == "probe"):
        stage = fit_probe_stage(config, built, ds, seed, mesh, method == "ekd_fpg", run_workdir)
        rep = sharding.replicated(mesh)
        probe = jax.device_put(stage["probe"], rep)
        teacher = {**teacher, "probe": probe}  # no round trip
        if method == "ekd_fpg":
            state = state.replace(params={**state.params,
                                          "prompt": jax.device_put(stage["prompt"], rep)})
    groups = metrics.class_groups(info.class_counts, tuple(config.kd.group_boundaries))
    evaluator = Evaluator(built.eval_step, ds.splits, batch_size=tcfg.eval_batch_size,
                          preprocess=eval_preprocess(config, info, seed), mesh=mesh,
                          multi_label=False, num_workers=config.data.num_workers,
                          metrics_fn=functools.partial(long_tailed_metrics, groups=groups,
                                                       class_names=info.class_names))
    step_fn, d, setup = built.train_step, built.durations, built.setup

    def pure_step(st, batch, variables, probe):
        t = {} if variables is None else {"variables": variables}
        if probe is not None:
            t["probe"] = probe
        return step.train_step(st, t, batch, setup=setup)

    variables = None if teacher_model is None or method in step.STUDENT_ONLY else \
        teacher_model.variables
    return Run(
        mesh, state, lambda s, b: step_fn(s, teacher, b),
        stream_factory(config, ds["train"], info, seed, d), evaluator,
        loop_settings(tcfg, d), tcfg.batch_size, d, run_meta(config, method=method, seed=seed),
        ds=ds, evaluator=evaluator, step=pure_step, step_args=(variables, probe))


def run_one(method: str, seed: int, run_workdir: str, config, *, ds, teacher_model,
            mesh) -> dict:
    """The comparison's `run_one`: train and test one (method, seed) under its sub-config;
    returns flat `test/...` metrics."""
    run = build_student_run(method, seed, run_workdir, config, ds=ds,
                            teacher_model=teacher_model, mesh=mesh)
    return _result(run_workdir, *fit(run, run_workdir))


def run_group(method: str, seeds, run_workdirs, configs, group_dir: str, *, ds, teacher_model,
              mesh) -> list[dict]:
    """The comparison's `run_group`: the seeds of one method trained together
    (`train.seeds`: the frozen teacher shared, not stacked), each seed's result as
    `run_one`'s."""
    runs = [build_student_run(method, s, w, c, ds=ds, teacher_model=teacher_model, mesh=mesh)
            for s, w, c in zip(seeds, run_workdirs, configs)]
    fitted = train_seeds.fit_each(runs, run_workdirs, group_dir, what=f"kd {method}")
    return [_result(w, st, final) for w, (st, final) in zip(run_workdirs, fitted)]


def _result(run_workdir: str, state, final: dict) -> dict:
    """Flat `test/...` metrics; a learnt prompt saved beside them (prompt.npz)."""
    if "prompt" in state.params and sharding.is_lead_process():
        save_npz(os.path.join(run_workdir, "prompt.npz"), jax.device_get(state.params["prompt"]))
    return {f"test/{k}": v for k, v in final.items()}
