"""BiasPruner (Bayasi et al., MICCAI 2024): debiased continual learning by pruning the units
that fire for spurious features, one structured subnetwork per task, chosen at test time by
prediction entropy. PackNet (magnitude masks per task) and the ablation "magnitude instead of
bias score" run on the same subnetwork machinery; fine-tune, joint, EWC and LwF are in
continual_baselines.py; the frame (tasks, evaluation, report) in continual.py.

Per task t (ResNets; a unit is an inner channel of a residual block, `pruning.structured`):
  1. biased model: the free weights (owned by no earlier task) train with GCE (q = 0.7) while
     earlier tasks' weights take part in the forward pass, frozen bitwise (`masked_optimizer`'s
     `trainable`);
  2. easy / hard split: training samples the GCE model classifies correctly are bias-aligned;
  3. bias score per unit = mean over aligned samples of its spatially averaged post-ReLU
     activation minus the same mean over conflicting samples, from captured activations in
     one jitted pass per batch;
  4. prune: rank all units globally, remove the top gamma fraction (the paper's direction: the
     highest scores; the reference code keeps them), never emptying a unit group; the kept
     units are subnetwork M_t, which may reuse earlier tasks' units (still frozen);
  5. fine-tune M_t with CE, optionally weighting samples by exp(alpha * GCE loss); only
     weights owned by t change;
  6. store M_t's channel mask, its head, and its BatchNorm parameters and statistics.

Decisions the paper leaves open:
  - Weight ownership: a weight belongs to the first task whose subnetwork holds all units it
    connects (conv1 filters: their unit; conv2 inputs: their unit). Weights with no unit (stem,
    downsample convolutions: the residual stream) belong to task 0, so later tasks adapt only
    inner channels. A weight owned by an earlier task is never updated again.
  - Every task has its own BatchNorm parameters and statistics (all BN layers) and head;
    task t starts from task t-1's BN.
  - Phase 1 (GCE) trains the free weights of all units; units pruned from M_t stay free.
  - Global ranking uses raw scores across layers, as the paper describes.
  - Task-agnostic inference runs every stored subnetwork inside one compiled program over
    the stacked masks, BN and heads: `jax.vmap` (continual.task_axis='vmap') or `lax.map`
    (the default, since vmapping over weights turns convolutions into grouped ones, which
    were slower in every measurement: benchmarks/RESULTS.md).
  - The ablation 'magnitude' changes only the ranking (filter L1 norm, the lowest pruned): the
    GCE phase and the exp(alpha * GCE) fine-tuning weights stay, so the two differ in which
    units are removed and nothing else.
"""

from __future__ import annotations

import functools
import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import losses
from jaxmed.data import augment
from jaxmed.methods import continual, continual_baselines, supervised
from jaxmed.pruning import criteria, structured, sweep
from jaxmed.pruning.masks import _is_none, apply_masks

log = logging.getLogger(__name__)
FREE = np.int32(2**30)


ALL_METHODS = "biaspruner,biaspruner_magnitude,packnet,finetune,joint,ewc,lwf"


def default_config():
    c = continual.default_config()
    c.model.name = "resnet56"
    return c


def real_data_config(dataset: str, augment: str, epochs: int):
    """The paper's setting on a real dataset: ImageNet-stem ResNet-18 at 224 px, Adam 1e-4
    (default_config), batch 32, every method compared, `epochs` per phase."""
    c = default_config()
    c.data.name = dataset
    c.data.image_size = 224
    c.data.channels = 3
    c.data.train_augment = augment
    c.data.num_workers = 8
    c.model.name = "resnet18"
    c.model.stem = "imagenet"
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    c.continual.methods = ALL_METHODS
    c.continual.biased_epochs = c.continual.finetune_epochs = epochs
    return c


def train_and_evaluate(config, workdir: str) -> dict:
    learners = {
        "biaspruner": functools.partial(SubnetLearner, selection="bias"),
        "biaspruner_magnitude": functools.partial(SubnetLearner, selection="magnitude"),
        "packnet": functools.partial(SubnetLearner, selection="packnet"),
        **continual_baselines.LEARNERS,
    }
    return continual.run(config, workdir, learners)


# ------------------------------------------------------------------------ parameter roles
def _path(p) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in p)


def is_shared_kernel(path: str) -> bool:
    return path.endswith("kernel") and not path.startswith("fc/")


def is_bn(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("scale", "bias") and not path.startswith("fc/")


def kept_weights(params, channel: dict[str, np.ndarray]):
    """Per shared kernel, True where every unit the weight connects is kept (residual-stream
    endpoints always count as kept)."""
    keep = jax.tree_util.tree_map_with_path(
        lambda p, v: np.ones(np.shape(v), bool) if is_shared_kernel(_path(p)) else None, params)
    for u in structured.resnet_units(params):
        m = np.asarray(channel[u.name], bool)
        keep[u.block][u.conv]["kernel"] = keep[u.block][u.conv]["kernel"] & m
        keep[u.block][u.next]["kernel"] = keep[u.block][u.next]["kernel"] & m[:, None]
    return keep


# ------------------------------------------------------------------------------ the learner
class SubnetLearner:
    """One pruned subnetwork per task over shared weights; selection 'bias' (BiasPruner),
    'magnitude' (the ablation: filter L1 instead of bias score) or 'packnet' (unstructured
    magnitude masks over free weights, per layer, CE in both phases)."""

    def __init__(self, env: continual.Env, selection: str):
        cfg = env.config
        if not cfg.model.name.startswith("resnet"):
            raise ValueError("BiasPruner's units are ResNet inner channels: use a resnet model")
        sweep.check_axis(cfg.continual.task_axis, "config.continual.task_axis")
        self.env, self.selection = env, selection
        self.task_axis = cfg.continual.task_axis
        self.model = supervised.build_model(cfg.model, 1)  # heads live outside the model
        self.max_classes = env.max_classes
        rng = jax.random.PRNGKey(cfg.seed)
        v = supervised.init_variables(self.model, cfg.model, rng, env.image_shape)
        feats = jax.eval_shape(lambda v, x: self.model.apply(v, x, features=True)[1], v,
                               jnp.zeros((1, *env.image_shape)))
        t_max = env.num_tasks
        self.backbone = jax.device_get(v["params"])
        self.task_bn = [self._bn_leaves(self.backbone)] * t_max
        self.task_stats = [jax.device_get(v["batch_stats"])] * t_max
        self.heads = jax.device_get(continual.init_heads(jax.random.fold_in(rng, 1), t_max,
                                                         feats.shape[-1], self.max_classes))
        self.owner = jax.tree_util.tree_map_with_path(
            lambda p, x: np.full(np.shape(x), FREE, np.int32) if is_shared_kernel(_path(p))
            else None, self.backbone)
        self.channel = [None] * t_max  # BiasPruner / ablation: {unit: bool[C]} per task
        self.stored = 0
        self.split_counts = np.zeros((t_max, 2), np.int64)  # GCE model: aligned, conflicting
        # One optimizer for every phase (constant learning rate, as the reference's Adam);
        # a fresh optimizer state per phase.
        self.tx = supervised.make_optimizer(cfg.train, 1)
        self._stacked = None
        self._logits = jax.jit(self._all_logits)
        self._step = env.jit_step(self._train_step, static_argnames=("gce",))
        self._scores = jax.jit(self._bias_sums)
        self._gce = jax.jit(self._gce_per_sample)

    # -- parameter assembly
    def _bn_leaves(self, params) -> dict:
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        return {k: np.asarray(v) for k, v in flat.items() if is_bn(k)}

    def _with_bn(self, params, bn: dict):
        flat = flax.traverse_util.flatten_dict(params, sep="/")
        flat.update(bn)
        return flax.traverse_util.unflatten_dict(flat, sep="/")

    def _fwd_mask(self, t: int):
        """The parameter mask of subnetwork t (broadcasting leaves), or all-True if untrained."""
        if self.selection == "packnet":
            return jax.tree.map(lambda o: None if o is None else (o <= t), self.owner,
                                is_leaf=_is_none)
        channel = self.channel[t] or {u.name: np.ones(u.width, bool)
                                      for u in structured.resnet_units(self.backbone)}
        return jax.device_get(structured.param_masks(self.backbone, channel))

    # -- compiled pieces
    def _features(self, params, stats, images, train: bool):
        x = augment.normalize(images)
        if train:
            (_, feats), new = self.model.apply({"params": params, "batch_stats": stats}, x,
                                               train=True, features=True,
                                               mutable=["batch_stats"])
            return feats, new["batch_stats"]
        _, feats = self.model.apply({"params": params, "batch_stats": stats}, x, train=False,
                                    features=True)
        return feats, stats

    def _train_step(self, state, batch, trainable, fwd_mask, weights, t, cmask, gce: bool):
        cfg = self.env.config.continual

        def loss_fn(params):
            masked = apply_masks(params["backbone"], fwd_mask)
            feats, new_stats = self._features(masked, state.batch_stats, batch["image"], True)
            logits = continual.head_logits(feats, params["heads"], cmask)[:, t]
            per = (losses.gce(logits, batch["label"], cfg.gce_q) if gce
                   else losses.cross_entropy(logits, batch["label"]))
            w = batch["valid"].astype(jnp.float32) * weights[batch["index"]]
            return losses.weighted_mean(per, w), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(self.tx, grads, trainable=trainable,
                                      batch_stats=new_stats)
        return state, {"loss": loss, "grad_norm": jnp.sqrt(sum(
            jnp.sum(g * g) for g in jax.tree.leaves(grads)))}

    def _bias_sums(self, params, stats, heads, cmask, t, images, labels, valid):
        """Per unit: summed spatial-mean activations of correctly / wrongly classified samples
        (the GCE model's easy / hard split), and the two counts."""
        x = augment.normalize(images)
        _, feats, acts = self.model.apply({"params": params, "batch_stats": stats}, x,
                                          train=False, features=True, capture=True)
        pred = jnp.argmax(continual.head_logits(feats, heads, cmask)[:, t], -1)
        easy = (pred == labels) & valid
        hard = (pred != labels) & valid
        means = {k: jnp.mean(a.astype(jnp.float32), axis=(1, 2)) for k, a in acts.items()}
        return ({k: easy.astype(jnp.float32) @ m for k, m in means.items()},
                {k: hard.astype(jnp.float32) @ m for k, m in means.items()},
                jnp.sum(easy), jnp.sum(hard))

    def _all_logits(self, backbone, task_bn, task_stats, heads, masks, cmask, images):
        def one(bn, stats, mask, head_k, head_b):
            params = apply_masks(self._with_bn(backbone, bn), mask)
            feats, _ = self._features(params, stats, images, False)
            return feats.astype(jnp.float32) @ head_k + head_b
        logits = sweep.over_stack(lambda a: one(*a), (task_bn, task_stats, masks,
                                                       heads["kernel"], heads["bias"]),
                                  self.task_axis)
        return jnp.where(cmask[None], jnp.transpose(logits, (1, 0, 2)), continual.NEG)

    # -- the per-task cycle
    def _trainable(self, t: int, owner_value):
        """Shared kernels owned by `owner_value`, the task's own BN copy and its head."""
        flat_owner = flax.traverse_util.flatten_dict(self.owner, sep="/")
        flat = {}
        for k in flax.traverse_util.flatten_dict(self.backbone, sep="/"):
            if is_shared_kernel(k):
                flat[k] = flat_owner[k] == owner_value
            elif is_bn(k):
                flat[k] = np.ones((), bool)
            else:
                flat[k] = np.zeros((), bool)
        head = (np.arange(self.env.num_tasks) == t)[:, None, None]
        return {"backbone": flax.traverse_util.unflatten_dict(flat, sep="/"),
                "heads": {"kernel": head, "bias": head[:, :, 0]}}

    def train_task(self, t: int, task: continual.Task, workdir: str) -> None:
        cfg = self.env.config
        cc = cfg.continual
        source = task.splits["train"]
        cmask = jnp.asarray(continual.class_mask(self.env.tasks, self.env.num_tasks,
                                                 self.max_classes))
        if t > 0:
            self.task_bn[t], self.task_stats[t] = self.task_bn[t - 1], self.task_stats[t - 1]
        params = {"backbone": self._with_bn(self.backbone, self.task_bn[t]), "heads": self.heads}
        n_index = self.env.index_bound
        ones = jnp.ones(n_index, jnp.float32)
        all_units = jax.tree.map(lambda m: None if m is None else np.ones_like(m),
                                 self._fwd_mask(t), is_leaf=_is_none)
        gce = self.selection != "packnet"

        # 1. the biased (GCE) model on the free weights
        state = continual.state_from(params, self.task_stats[t], self.tx,
                                     jax.random.PRNGKey(cfg.seed + t))
        trainable = self._trainable(t, FREE)
        step = lambda s, b: self._step(s, b, trainable, all_units, ones, t, cmask, gce=gce)  # noqa
        state = continual.run_phase(self.env, f"{workdir}/biased", state, step, source,
                                    cc.biased_epochs, cfg.seed + 10 * t)
        params = jax.device_get(state.params)
        stats = jax.device_get(state.batch_stats)

        # 2-4. scores -> the kept units / weights
        weights = ones
        if self.selection == "packnet":
            self._select_packnet(t, params["backbone"])
        else:
            if self.selection == "bias":
                scores, per_sample = self._bias_scores(params, stats, cmask, t, source)
                prune = "highest"
            else:
                # The ablation changes the unit ranking only; fine-tuning keeps the GCE weights.
                scores = {k: np.asarray(v) for k, v in
                          structured.filter_l1_scores(params["backbone"]).items()}
                per_sample = self._gce_losses(params, stats, cmask, t, source)
                prune = "lowest"
            self.channel[t] = structured.channel_masks(scores, cc.gamma, prune=prune)
            keep = kept_weights(params["backbone"], self.channel[t])
            self.owner = jax.tree.map(
                lambda o, k: None if o is None else np.where((o == FREE) & k, t, o).astype(
                    np.int32), self.owner, keep, is_leaf=_is_none)
            if cc.alpha > 0:
                table = np.ones(n_index, np.float32)
                table[per_sample[0]] = np.exp(cc.alpha * per_sample[1])
                weights = jnp.asarray(table)
                w = np.sort(table[per_sample[0]])[::-1]
                top = max(1, len(w) // 20)
                log.info("task %d fine-tune weights: median %.2f, max %.2f; the heaviest 5%% "
                         "carry %.0f%% of the total", t, np.median(w), w[0],
                         100 * w[:top].sum() / w.sum())

        # 5. fine-tune the subnetwork; only weights now owned by t change
        self.backbone = params["backbone"]
        state = continual.state_from(params, stats, self.tx,
                                     jax.random.PRNGKey(cfg.seed + 100 + t))
        trainable = self._trainable(t, t)
        mask = self._fwd_mask(t)
        step = lambda s, b: self._step(s, b, trainable, mask, weights, t, cmask,  # noqa: E731
                                       gce=False)
        state = continual.run_phase(self.env, f"{workdir}/finetune", state, step, source,
                                    cc.finetune_epochs, cfg.seed + 10 * t + 1)

        # 6. store
        params = jax.device_get(state.params)
        self.backbone = params["backbone"]
        self.heads = params["heads"]
        self.task_bn[t] = self._bn_leaves(params["backbone"])
        self.task_stats[t] = jax.device_get(state.batch_stats)
        self.stored = t + 1
        self._stacked = None

    def _bias_scores(self, params, stats, cmask, t, source):
        total = None  # summed on device; fetched once after the pass
        for b in self.env.batches(source):
            part = self._scores(params["backbone"], stats, params["heads"], cmask, t,
                                b["image"], b["label"], b["valid"])
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        easy, hard, n_easy, n_hard = jax.device_get(total)
        n_easy, n_hard = int(n_easy), int(n_hard)
        if n_easy == 0 or n_hard == 0:
            log.warning("bias scores: %d aligned and %d conflicting samples; a missing group "
                        "counts as zero activation", n_easy, n_hard)
        scores = {k: np.asarray(easy[k]) / max(n_easy, 1) - np.asarray(hard[k]) / max(n_hard, 1)
                  for k in easy}
        self.split_counts[t] = (n_easy, n_hard)
        log.info("task %d: %d bias-aligned, %d bias-conflicting training samples", t, n_easy,
                 n_hard)
        per_sample = self._gce_losses(params, stats, cmask, t, source)
        return scores, per_sample

    def _gce_per_sample(self, params, stats, cmask, t, images, labels):
        """The GCE loss value (1 - p_y^q) / q in [0, 1/q]: ~0 for samples the biased model
        gets right confidently, ~1/q for the bias-conflicting ones."""
        feats, _ = self._features(params["backbone"], stats, images, False)
        logits = continual.head_logits(feats, params["heads"], cmask)[:, t]
        q = self.env.config.continual.gce_q
        p_y = jnp.exp(-losses.cross_entropy(logits, labels))
        return (1.0 - p_y**q) / q

    def _gce_losses(self, params, stats, cmask, t, source):
        """Per-sample GCE loss of the biased model (for exp(alpha * loss) weights)."""
        idx, vals, keep = [], [], []
        for b in self.env.batches(source):
            keep.append(np.asarray(b["valid"], bool))
            idx.append(np.asarray(b["index"]))
            vals.append(self._gce(params, stats, cmask, t, b["image"], b["label"]))
        vals = jax.device_get(vals)  # one fetch after dispatching every batch
        return (np.concatenate([i[k] for i, k in zip(idx, keep)]),
                np.concatenate([v[k] for v, k in zip(vals, keep)]))

    def _select_packnet(self, t, backbone):
        """Keep the largest (1 - gamma) of each layer's free weights for task t; zero the rest
        (they stay free for later tasks)."""
        gamma = self.env.config.continual.gamma
        flat_o = flax.traverse_util.flatten_dict(self.owner, sep="/")
        flat_p = flax.traverse_util.flatten_dict(backbone, sep="/")
        for k, o in flat_o.items():
            if o is None:
                continue
            free = o == FREE
            n_free = int(free.sum())
            if n_free == 0:
                continue
            mag = np.where(free, np.abs(flat_p[k]), -1.0).ravel()
            n_prune = criteria.prune_count(gamma, n_free)
            order = np.argsort(mag, kind="stable")
            prune = np.zeros(mag.size, bool)
            prune[order[int((~free).sum()):int((~free).sum()) + n_prune]] = True
            prune = prune.reshape(o.shape)
            flat_o[k] = np.where(free & ~prune, t, o).astype(np.int32)
            flat_p[k] = np.where(free & prune, 0.0, flat_p[k]).astype(flat_p[k].dtype)
        self.owner = flax.traverse_util.unflatten_dict(flat_o, sep="/")
        backbone.update(flax.traverse_util.unflatten_dict(flat_p, sep="/"))

    # -- inference and persistence
    def all_logits(self, images):
        if self._stacked is None:  # every task's subnetwork, stacked for one vmapped program
            stack = lambda xs: jax.tree.map(  # noqa: E731
                lambda *a: None if a[0] is None else np.stack(a), *xs, is_leaf=_is_none)
            masks = [self._fwd_mask(t) for t in range(self.env.num_tasks)]
            cmask = continual.class_mask(self.env.tasks, self.env.num_tasks, self.max_classes)
            self._stacked = jax.device_put((self.backbone, stack(self.task_bn),
                                            stack(self.task_stats), self.heads, stack(masks),
                                            cmask))
        return self._logits(*self._stacked, images)

    def mask_report(self) -> dict:
        """Per task: units kept / owned, the overlap (IoU) of the subnetworks, and how many
        training samples the GCE model found bias-aligned / conflicting (bias selection only;
        zeros otherwise)."""
        t_max = self.stored
        if self.selection == "packnet":
            owner = np.concatenate([np.ravel(o) for o in jax.tree.leaves(self.owner)])
            sets = [owner <= t for t in range(t_max)]
            owned = [int((owner == t).sum()) for t in range(t_max)]
            unit = "weights"
        else:
            sets = [np.concatenate([np.asarray(self.channel[t][k]) for k in
                                    sorted(self.channel[t])]) for t in range(t_max)]
            first = np.full(sets[0].size, -1) if sets else np.zeros(0)
            for t in range(t_max - 1, -1, -1):
                first = np.where(sets[t], t, first)
            owned = [int((first == t).sum()) for t in range(t_max)]
            unit = "units"
        total = int(sets[0].size) if sets else 0
        iou = [[float((a & b).sum() / max((a | b).sum(), 1)) for b in sets] for a in sets]
        return {"unit": unit, "total": total, "kept": [int(s.sum()) for s in sets],
                "owned": owned, "iou": iou,
                "aligned": [int(v) for v in self.split_counts[:t_max, 0]],
                "conflicting": [int(v) for v in self.split_counts[:t_max, 1]]}

    def state(self) -> dict:
        return {"backbone": self.backbone, "heads": self.heads, "owner": self.owner,
                "task_bn": {str(t): bn for t, bn in enumerate(self.task_bn)},
                "task_stats": {str(t): s for t, s in enumerate(self.task_stats)},
                "channel": {str(t): c for t, c in enumerate(self.channel) if c is not None},
                "split_counts": self.split_counts, "stored": np.int32(self.stored)}

    def load(self, s: dict) -> None:
        self.backbone, self.heads = s["backbone"], s["heads"]
        self.owner = self.owner_template_fill(s["owner"])
        self.task_bn = [flax.traverse_util.flatten_dict(s["task_bn"][str(t)], sep="/")
                        for t in range(self.env.num_tasks)]
        self.task_stats = [s["task_stats"][str(t)] for t in range(self.env.num_tasks)]
        chan = s.get("channel", {})
        self.channel = [flax.traverse_util.flatten_dict(chan[str(t)], sep="/")
                        if str(t) in chan else None for t in range(self.env.num_tasks)]
        self.stored = int(s["stored"])
        self.split_counts = np.asarray(s.get("split_counts", self.split_counts))
        self._stacked = None

    def owner_template_fill(self, owner):
        """Saved owner arrays back into the tree shape with None at non-kernel leaves."""
        flat = flax.traverse_util.flatten_dict(owner, sep="/")
        return jax.tree_util.tree_map_with_path(
            lambda p, v: flat[_path(p)] if is_shared_kernel(_path(p)) else None, self.backbone)

