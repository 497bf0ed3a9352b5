"""Continual-learning baselines on one shared network with a head per task: fine-tune (lower
bound), joint training on every task so far (upper bound), EWC (diagonal Fisher) and LwF
(distillation to the previous model). PackNet shares BiasPruner's subnetwork machinery
(subnetworks.py). Each trains biased_epochs + finetune_epochs epochs per task, BiasPruner's
budget, with the same optimizer; BatchNorm is shared (as in the papers).

What changes is the `SharedNetwork` pytree (params, BN statistics, the accumulated Fisher and
its anchor); the LwF teacher is the state before the task. The step, the Fisher pass and inference
are module-level jitted functions of it; the kind ('finetune', 'joint', 'ewc', 'lwf') and the
loss weights are static values. A task is one phase (`task_run`), so the seeds of a baseline
train each task as one program on the seed axis (run.run_seeds).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import losses
from jaxmed.data.sources import ConcatSource
from jaxmed.methods.biaspruner import frame
from jaxmed.train import build, sharding, steps
from jaxmed.train import run as run_lib
from jaxmed.train.hyper import FromConfig

KINDS = ("finetune", "joint", "ewc", "lwf")


@flax.struct.dataclass
class SharedNetwork:
    """params: {'backbone', 'heads' ([T, F, C_max] / [T, C_max])}; stats: batch_stats;
    fisher: accumulated diagonal Fisher of the tasks so far (backbone-shaped; zeros unless EWC);
    anchor: the backbone after the last task (EWC's centre); cmask: [T, C_max]; stored: tasks
    trained."""

    params: Any
    stats: Any
    fisher: Any
    anchor: Any
    cmask: Any
    stored: Any


@flax.struct.dataclass
class TaskInputs:
    """What one task's step reads besides the train state: trainable mask, the task, the LwF
    teacher (params and stats of the model before the task) and EWC's Fisher and anchor."""

    trainable: Any
    task: Any
    teacher: Any
    teacher_stats: Any
    fisher: Any
    anchor: Any
    cmask: Any


@dataclasses.dataclass(frozen=True)
class Setup(FromConfig):
    """Static values of one run: the model, the optimizer, the kind, and the loss weights
    named as their `config.continual` keys."""

    model: Any
    tx: Any
    kind: str
    ewc_lambda: float
    lwf_lambda: float
    lwf_temperature: float
    ewc_samples: int


def task_step(state, batch, inputs: TaskInputs, *, model, tx, kind: str, ewc_lambda: float,
              lwf_lambda: float, temperature: float):
    """The pure step: CE on each sample's own task head, plus EWC's quadratic penalty or LwF's
    distillation on every earlier task's head. Everything per seed (the teacher, the Fisher,
    the task) is in `inputs`, so the seed axis batches it over seeds."""
    steps.check_batch(batch)

    def loss_fn(params):
        feats, new_stats = frame.features(model, params["backbone"], state.batch_stats,
                                          batch["image"], train=True)
        all_logits = frame.head_logits(feats, params["heads"], inputs.cmask)
        logits = frame.pick(all_logits, batch["attrs"]["task"])
        loss = losses.weighted_mean(losses.cross_entropy(logits, batch["label"]),
                                    batch["valid"])
        if kind == "ewc":
            penalty = jax.tree.map(lambda f, p, a: jnp.sum(f * (p - a) ** 2), inputs.fisher,
                                   params["backbone"], inputs.anchor)
            loss += ewc_lambda / 2 * sum(jax.tree.leaves(penalty))
        if kind == "lwf":
            old_feats, _ = frame.features(model, inputs.teacher["backbone"],
                                          inputs.teacher_stats, batch["image"], train=False)
            old = frame.head_logits(old_feats, inputs.teacher["heads"], inputs.cmask)
            # KD on every earlier task's head (their classes only).
            kd = jax.vmap(lambda s, o: losses.kd(s, o, temperature), in_axes=1, out_axes=1)(
                all_logits, jax.lax.stop_gradient(old))
            earlier = (jnp.arange(all_logits.shape[1]) < inputs.task).astype(jnp.float32)
            loss += lwf_lambda * losses.weighted_mean(jnp.sum(kd * earlier[None], -1),
                                                      batch["valid"])
        return loss, new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(tx, grads, trainable=inputs.trainable, batch_stats=new_stats)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("model", "tx", "kind", "ewc_lambda", "lwf_lambda",
                                             "temperature", "mesh"), donate_argnums=0)
def train_step(state, batch, inputs: TaskInputs, *, model, tx, kind: str, ewc_lambda: float,
               lwf_lambda: float, temperature: float, mesh):
    """`task_step` jitted, its outputs replicated on the mesh."""
    out = task_step(state, batch, inputs, model=model, tx=tx, kind=kind, ewc_lambda=ewc_lambda,
                    lwf_lambda=lwf_lambda, temperature=temperature)
    return jax.lax.with_sharding_constraint(out, sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnames=("model",))
def squared_grads(params, stats, task, cmask, batch, *, model):
    """Sum over the batch's valid samples of the squared per-sample gradient of the true
    label's log-likelihood (backbone-shaped), and the number of samples."""
    def nll(p, x, y):
        f, _ = frame.features(model, p, stats, x[None], train=False)
        lg = jnp.take(frame.head_logits(f, params["heads"], cmask)[0], task, axis=0)
        return -jax.nn.log_softmax(lg)[y]

    g = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(params["backbone"], batch["image"],
                                                       batch["label"])
    w = batch["valid"].astype(jnp.float32)
    return jax.tree.map(lambda x: jnp.tensordot(w, x * x, axes=1), g), jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("model",))
def predict_batch(state: SharedNetwork, batch, valid_tasks, *, model):
    """Every head's logits, then entropy task selection (`frame.decide`), in one program."""
    chex.assert_rank(batch["image"], 4)
    chex.assert_shape(valid_tasks, (state.cmask.shape[0],))
    feats, _ = frame.features(model, state.params["backbone"], state.stats, batch["image"],
                              train=False)
    logits = frame.head_logits(feats, state.params["heads"], state.cmask)
    return frame.decide(logits, state.cmask, valid_tasks)


def predict(setup: Setup, state: SharedNetwork, batch, *, valid_tasks):
    return predict_batch(state, batch, valid_tasks, model=setup.model)


def init(seq: frame.TaskSequence, kind: str) -> tuple[Setup, SharedNetwork]:
    if kind not in KINDS:
        raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")
    cfg, cc = seq.config, seq.config.continual
    model = build.build_model(cfg.model, 1)
    rng = jax.random.PRNGKey(cfg.seed)
    v = build.init_variables(model, cfg.model, rng, seq.image_shape)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, features=True)[1], v,
                           jnp.zeros((1, *seq.image_shape)))
    backbone = jax.tree.map(np.asarray, v["params"])
    heads = jax.device_get(frame.init_heads(jax.random.fold_in(rng, 1), seq.num_tasks,
                                            feats.shape[-1], seq.max_classes))
    state = SharedNetwork(params={"backbone": backbone, "heads": heads},
                          stats=v["batch_stats"], fisher=jax.tree.map(np.zeros_like, backbone),
                          anchor=backbone, cmask=seq.cmask, stored=np.int32(0))
    setup = Setup.from_config(cc, model=model, tx=build.make_optimizer(cfg.train, 1), kind=kind)
    return setup, state


def task_run(seq: frame.TaskSequence, setup: Setup, state: SharedNetwork, t: int):
    """Task t as one phase: its `Run` (biased_epochs + finetune_epochs epochs of the task, or of
    every task so far for joint; the pure step for the seed axis, with the task's inputs as its
    argument) and `finish(trained) -> SharedNetwork` (EWC's Fisher and anchor added)."""
    cfg = seq.config
    cc = cfg.continual
    s = jax.device_get(state)
    source = seq.tasks[t].splits["train"]
    if setup.kind == "joint":
        source = ConcatSource([x.splits["train"] for x in seq.tasks[: t + 1]])
    tasks = np.arange(seq.num_tasks)
    heads = tasks <= t if setup.kind == "joint" else tasks == t
    trainable = {"backbone": jax.tree.map(lambda _: np.ones((), bool), s.params["backbone"]),
                 "heads": {"kernel": heads[:, None, None], "bias": heads[:, None]}}
    lwf, ewc = setup.kind == "lwf", setup.kind == "ewc"  # only what the kind reads goes to devices
    host_inputs = TaskInputs(trainable, np.int32(t), s.params if lwf else None,
                             s.stats if lwf else None, s.fisher if ewc else None,
                             s.anchor if ewc else None, s.cmask)
    ts = frame.state_from(s.params, s.stats, setup.tx, jax.random.PRNGKey(cfg.seed + t))
    static = dict(model=setup.model, tx=setup.tx, kind=setup.kind, ewc_lambda=setup.ewc_lambda,
                  lwf_lambda=setup.lwf_lambda, temperature=setup.lwf_temperature)
    step = functools.partial(train_step, inputs=seq.replicate(host_inputs), mesh=seq.mesh,
                             **static)
    run = frame.phase_run(seq, ts, step, source, cc.biased_epochs + cc.finetune_epochs,
                          cfg.seed + 10 * t, pure=functools.partial(task_step, **static),
                          step_args=(host_inputs,))

    def finish(trained) -> SharedNetwork:
        params, stats = jax.device_get((trained.params, trained.batch_stats))
        fisher, anchor = s.fisher, s.anchor
        if setup.kind == "ewc":
            f = fisher_of(seq, setup, params, stats, t, s.cmask, seq.tasks[t].splits["train"])
            fisher = jax.tree.map(np.add, fisher, f)
            anchor = params["backbone"]
        return SharedNetwork(params=params, stats=stats, fisher=fisher, anchor=anchor,
                             cmask=s.cmask, stored=np.int32(t + 1))

    return run, finish


def train_task(seq: frame.TaskSequence, setup: Setup, state: SharedNetwork, t: int,
               workdir: str) -> SharedNetwork:
    run, finish = task_run(seq, setup, state, t)
    return finish(run_lib.fit(run, f"{workdir}/train")[0])


def fisher_of(seq, setup: Setup, params, stats, t: int, cmask, source):
    """Diagonal empirical Fisher of task t: mean squared per-sample gradient of the
    log-likelihood of the true label, over the first batches of at least ewc_samples training
    samples (batches of 16, or one row per device; summed on device, fetched once)."""
    rep = seq.replicate((params, stats, np.int32(t), cmask))
    n = seq.mesh.devices.size
    size = n * -(-16 // n)  # at least 16 and a multiple of the device count
    total, counts = None, []
    for i, b in enumerate(seq.batches(source, size)):
        if i * size >= setup.ewc_samples:  # the same number of batches on every process
            break
        sq, k = squared_grads(*rep, sharding.to_global(b, seq.mesh), model=setup.model)
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        counts.append(k)
    total, counts = sharding.to_host((total, counts))
    return jax.tree.map(lambda x: np.asarray(x) / max(float(np.sum(counts)), 1.0), total)


def method(kind: str) -> frame.Method:
    return frame.Method(build=functools.partial(init, kind=kind), train_task=train_task,
                        predict=predict, task_run=task_run)
