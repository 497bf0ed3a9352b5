"""Continual-learning baselines on one shared network with a head per task: fine-tune (lower
bound), joint training on every task so far (upper bound), EWC (diagonal Fisher) and LwF
(distillation to the previous model). PackNet shares BiasPruner's subnetwork machinery
(biaspruner.py). Each trains biased_epochs + finetune_epochs epochs per task, BiasPruner's
budget, with the same optimizer; BatchNorm is shared (as in the papers)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import losses
from jaxmed.data import augment
from jaxmed.methods import continual, supervised


class SharedLearner:
    """kind: 'finetune', 'joint', 'ewc' or 'lwf'."""

    def __init__(self, env: continual.Env, kind: str):
        cfg = env.config
        self.env, self.kind = env, kind
        self.model = supervised.build_model(cfg.model, 1)
        self.max_classes = env.max_classes
        rng = jax.random.PRNGKey(cfg.seed)
        v = supervised.init_variables(self.model, cfg.model, rng, env.image_shape)
        feats = jax.eval_shape(lambda v, x: self.model.apply(v, x, features=True)[1], v,
                               jnp.zeros((1, *env.image_shape)))
        self.params = {"backbone": jax.device_get(v["params"]),
                       "heads": jax.device_get(continual.init_heads(
                           jax.random.fold_in(rng, 1), env.num_tasks, feats.shape[-1],
                           self.max_classes))}
        self.stats = jax.device_get(v["batch_stats"])
        zeros = jax.tree.map(np.zeros_like, self.params["backbone"])
        self.fisher, self.anchor = zeros, self.params["backbone"]
        self.stored = 0
        self.tx = supervised.make_optimizer(cfg.train, 1)
        self.cmask = continual.class_mask(env.tasks, env.num_tasks, self.max_classes)
        self._step = env.jit_step(self._train_step)
        self._logits = jax.jit(self._all_logits)
        self._sq_grads = jax.jit(self._per_sample_sq_grads)

    def _features(self, params, stats, images, train: bool):
        x = augment.normalize(images)
        if train:
            (_, f), new = self.model.apply({"params": params, "batch_stats": stats}, x,
                                           train=True, features=True, mutable=["batch_stats"])
            return f, new["batch_stats"]
        return self.model.apply({"params": params, "batch_stats": stats}, x, train=False,
                                features=True)[1], stats

    def _train_step(self, state, batch, trainable, t, teacher, teacher_stats, fisher, anchor):
        cc = self.env.config.continual
        cmask = jnp.asarray(self.cmask)

        def loss_fn(params):
            feats, new_stats = self._features(params["backbone"], state.batch_stats,
                                              batch["image"], True)
            all_logits = continual.head_logits(feats, params["heads"], cmask)
            logits = continual.pick(all_logits, batch["attrs"]["task"])
            loss = losses.weighted_mean(losses.cross_entropy(logits, batch["label"]),
                                        batch["valid"])
            if self.kind == "ewc":
                loss += cc.ewc_lambda / 2 * sum(
                    jnp.sum(f * (p - a) ** 2) for f, p, a in zip(
                        jax.tree.leaves(fisher), jax.tree.leaves(params["backbone"]),
                        jax.tree.leaves(anchor)))
            if self.kind == "lwf":
                old_feats, _ = self._features(teacher["backbone"], teacher_stats,
                                              batch["image"], False)
                old = continual.head_logits(old_feats, teacher["heads"], cmask)
                temp = cc.lwf_temperature
                # KD on every earlier task's head (their classes only).
                kd = jax.vmap(lambda s, o: losses.kd(s, o, temp), in_axes=1, out_axes=1)(
                    all_logits, jax.lax.stop_gradient(old))
                earlier = (jnp.arange(all_logits.shape[1]) < t).astype(jnp.float32)
                loss += cc.lwf_lambda * losses.weighted_mean(
                    jnp.sum(kd * earlier[None], -1), batch["valid"])
            return loss, new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(self.tx, grads, trainable=trainable,
                                      batch_stats=new_stats)
        return state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    def _all_logits(self, params, stats, images):
        feats, _ = self._features(params["backbone"], stats, images, False)
        return continual.head_logits(feats, params["heads"], jnp.asarray(self.cmask))

    def train_task(self, t: int, task: continual.Task, workdir: str) -> None:
        cfg = self.env.config
        cc = cfg.continual
        source = task.splits["train"]
        if self.kind == "joint":
            source = continual.ConcatSource([x.splits["train"] for x in self.env.tasks[: t + 1]])
        heads = np.arange(self.env.num_tasks) <= t if self.kind == "joint" else \
            np.arange(self.env.num_tasks) == t
        trainable = {"backbone": jax.tree.map(lambda _: np.ones((), bool),
                                              self.params["backbone"]),
                     "heads": {"kernel": heads[:, None, None], "bias": heads[:, None]}}
        teacher, teacher_stats = self.params, self.stats
        state = continual.state_from(self.params, self.stats, self.tx,
                                     jax.random.PRNGKey(cfg.seed + t))
        step = functools.partial(self._step_call, trainable=trainable, t=t, teacher=teacher,
                                 teacher_stats=teacher_stats)
        state = continual.run_phase(self.env, f"{workdir}/train", state, step, source,
                                    cc.biased_epochs + cc.finetune_epochs, cfg.seed + 10 * t)
        self.params, self.stats = jax.device_get(state.params), jax.device_get(state.batch_stats)
        if self.kind == "ewc":
            f = self._fisher(t, task.splits["train"])
            self.fisher = jax.tree.map(np.add, self.fisher, f)
            self.anchor = self.params["backbone"]
        self.stored = t + 1

    def _step_call(self, state, batch, *, trainable, t, teacher, teacher_stats):
        return self._step(state, batch, trainable, t, teacher, teacher_stats, self.fisher,
                          self.anchor)

    def _per_sample_sq_grads(self, params, stats, t, images, labels, valid):
        cmask = jnp.asarray(self.cmask)

        def nll(p, x, y):
            f, _ = self._features(p, stats, x[None], False)
            lg = continual.head_logits(f, params["heads"], cmask)[0, t]
            return -jax.nn.log_softmax(lg)[y]

        g = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(params["backbone"], images, labels)
        w = valid.astype(jnp.float32)
        return jax.tree.map(lambda x: jnp.tensordot(w, x * x, axes=1), g), jnp.sum(w)

    def _fisher(self, t: int, source):
        """Diagonal empirical Fisher of task t: mean squared per-sample gradient of the
        log-likelihood of the true label, over up to ewc_samples training samples."""
        total, n = None, 0.0
        for b in self.env.batches(source, 16):
            s, k = self._sq_grads(self.params, self.stats, t, b["image"], b["label"],
                                  b["valid"])
            total = s if total is None else jax.tree.map(jnp.add, total, s)
            n += float(k)
            if n >= self.env.config.continual.ewc_samples:
                break
        return jax.tree.map(lambda x: np.asarray(x) / max(n, 1.0), total)

    def all_logits(self, images):
        return self._logits(self.params, self.stats, images)

    def state(self) -> dict:
        return {"params": self.params, "stats": self.stats, "fisher": self.fisher,
                "anchor": self.anchor, "stored": np.int32(self.stored)}

    def load(self, s: dict) -> None:
        self.params, self.stats = s["params"], s["stats"]
        self.fisher, self.anchor = s["fisher"], s["anchor"]
        self.stored = int(s["stored"])


LEARNERS = {k: functools.partial(SharedLearner, kind=k) for k in ("finetune", "joint", "ewc",
                                                                   "lwf")}
