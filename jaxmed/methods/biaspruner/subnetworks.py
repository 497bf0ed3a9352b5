"""BiasPruner (Bayasi et al., MICCAI 2024): one pruned subnetwork per task over shared weights,
the units that fire for spurious features removed, chosen at test time by prediction entropy.
PackNet (magnitude masks per task) and the ablation "magnitude instead of bias score" run on the
same machinery (`selection` 'bias', 'magnitude', 'packnet').

What changes lives in one pytree, `Subnetworks`, stacked over tasks; the GCE / fine-tune step,
the scoring pass and all-subnetwork inference are module-level jitted functions of it (and of
plain static values: the model, the optimizer, q, the task axis). Host code between phases
(ranking units, updating owners) works on numpy copies once per task.

Per task t (ResNets; a unit is an inner channel of a residual block, `pruning.structured`):
  1. biased model: the free weights (owned by no earlier task) train with GCE (q = 0.7) while
     earlier tasks' weights take part in the forward pass, frozen bitwise (`masked_optimizer`'s
     `trainable`);
  2. easy / hard split: training samples the GCE model classifies correctly are bias-aligned;
  3. bias score per unit = mean over aligned samples of its spatially averaged post-ReLU
     activation minus the same mean over conflicting samples, from the model's sown
     intermediates in one jitted, sharded pass (`score_batch` under `evaluate.predict`);
     `continual.bias_score` picks the paper's or a variant of it (`scores`);
  4. prune: rank all units globally, remove the top gamma fraction (the paper's direction: the
     highest scores; the reference code keeps them), never emptying a unit group; the kept
     units are subnetwork M_t, which may reuse earlier tasks' units (still frozen);
  5. fine-tune M_t with CE, optionally weighting samples by exp(alpha * GCE loss) (and, with
     continual.balance_groups, scaling the hard samples' weights to the easy ones' total);
     only weights owned by t change;
  6. store M_t's channel mask, its head, and its BatchNorm parameters and statistics.

Decisions the paper leaves open:
  - Weight ownership: a weight belongs to the first task whose subnetwork holds all units it
    connects (conv1 filters: their unit; conv2 inputs: their unit). Weights with no unit (stem,
    downsample convolutions: the residual stream) belong to task 0, so later tasks adapt only
    inner channels. A weight owned by an earlier task is never updated again.
  - Every task has its own BatchNorm parameters and statistics (all BN layers) and head;
    task t starts from task t-1's BN.
  - Phase 1 (GCE) trains the free weights of all units; units pruned from M_t stay free.
  - Global ranking uses raw scores across layers, as the paper describes (the default,
    `continual.bias_score='paper'`); 'layer_normalised', 'class_conditional' and 'absolute'
    change only the score the one global cut ranks (`scores`: what each computes and why).
  - Task-agnostic inference runs every stored subnetwork inside one compiled program over
    the stacked masks, BN and heads: `jax.vmap` (continual.task_axis='vmap') or `lax.map`
    (the default, since vmapping over weights turns convolutions into grouped ones, which
    were slower in every measurement: benchmarks/RESULTS.md).
  - Task selection (`continual.task_selection`): 'entropy' as the paper, or 'bn': the task
    whose stored stem BatchNorm statistics give the image's stem activations the highest
    Gaussian likelihood (`stem_nll`, read by a flax method interceptor in the same forward
    pass). For BiasPruner the stem convolution belongs to task 0 and is frozen after it, so
    every subnetwork sees the same stem activations and the T scores are likelihoods of the
    same data under T tasks' statistics; deeper BatchNorm inputs differ per subnetwork and are
    not comparable. Decided because entropy picked the wrong task most of the time on the
    synthetic sequence (each subnetwork is more confident on the other task's images than the
    debiased one on its own: benchmarks/RESULTS.md), while the statistics every task stores
    anyway (step 6) tell the tasks apart.
  - Fine-tune weights (`continual.balance_groups`, our addition): exp(alpha * GCE) alone
    gives the hard samples a total weight set by their count and alpha, most of the total
    when they are few. On the synthetic sequence the subnetwork then memorised those few
    images instead of learning the true cue or, with flips and shifts, learnt the colour the
    other way round. Balancing the two groups' totals, as JTT's upweighting does, leaves the
    colour uninformative in the weighted training set whatever the counts; within each group
    exp(alpha * GCE) still ranks the harder samples higher. Off by default (the paper's
    weighting); the synthetic benchmark turns it on (measured: configs/biaspruner/benchmark.py).
  - The ablation 'magnitude' changes only the ranking (filter L1 norm, the lowest pruned): the
    GCE phase and the fine-tuning weights (exp(alpha * GCE), balanced or not) stay, so the
    two differ in which units are removed and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed import losses
from jaxmed.data import augment
from jaxmed.methods.biaspruner import frame, scores
from jaxmed.models.common import sown
from jaxmed.pruning import criteria, structured
from jaxmed.stacking import check_axis, over_stack
from jaxmed.pruning.masks import apply_masks
from jaxmed.train import build, sharding, steps
from jaxmed.train.evaluate import predict as predict_sharded
from jaxmed.train.hyper import FromConfig

log = logging.getLogger(__name__)
FREE = np.int32(2**30)  # owner of a weight no task holds yet
SELECTIONS = ("bias", "magnitude", "packnet")


# ------------------------------------------------------------------------ parameter roles
def is_shared_kernel(path: str) -> bool:
    return path.endswith("kernel") and not path.startswith("fc/")


def is_bn(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("scale", "bias") and not path.startswith("fc/")


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(dict(tree), sep="/")


def _unflat(flat: dict) -> dict:
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def subset(params, keep) -> dict:
    """The nested dict of the params' leaves whose path `keep` accepts."""
    return _unflat({k: v for k, v in _flat(params).items() if keep(k)})


def full_tree(part, params) -> dict:
    """A params-structured tree: `part`'s leaves where it has them, None elsewhere (a mask)."""
    flat = _flat(part)
    return _unflat({k: flat.get(k) for k in _flat(params)})


def with_bn(params, bn) -> dict:
    """params with the BatchNorm leaves replaced by `bn` (one task's copy)."""
    flat = _flat(params)
    flat.update(_flat(bn))
    return _unflat(flat)


def units_of(channel) -> dict:
    """{block: {conv: mask}} -> {'block/conv': mask} (structured's unit names)."""
    return _flat(channel)


def kept_weights(params, channel: dict[str, np.ndarray]) -> dict:
    """Per shared kernel, True where every unit the weight connects is kept (residual-stream
    endpoints always count as kept); nested like the params, shared kernels only."""
    keep = {k: np.ones(np.shape(v), bool) for k, v in _flat(params).items()
            if is_shared_kernel(k)}
    for u in structured.resnet_units(params):
        m = np.asarray(channel[u.name], bool)
        keep[f"{u.block}/{u.conv}/kernel"] = keep[f"{u.block}/{u.conv}/kernel"] & m
        keep[f"{u.block}/{u.next}/kernel"] = keep[f"{u.block}/{u.next}/kernel"] & m[:, None]
    return _unflat(keep)


# ------------------------------------------------------------------------------- the state
@flax.struct.dataclass
class Subnetworks:
    """Every task's subnetwork over one shared backbone; leading axis T on the stacked fields.

    backbone: shared params (its BN leaves are unused at inference: `task_bn` replaces them);
    task_bn: BN scale / bias, [T, C] per leaf; task_stats: batch_stats, [T, ...] per leaf;
    heads: {'kernel': [T, F, C_max], 'bias': [T, C_max]}; channel: {block: {conv: bool [T, C]}}
    units each task keeps (all True under PackNet, which masks weights); owner: int32 per
    shared-kernel weight, the task that owns it (FREE if none); cmask: [T, C_max] classes of
    each task; split_counts: [T, 2] aligned / conflicting samples of each GCE model; stored:
    number of tasks trained."""

    backbone: Any
    task_bn: Any
    task_stats: Any
    heads: Any
    channel: Any
    owner: Any
    cmask: Any
    split_counts: Any
    stored: Any


@flax.struct.dataclass
class Phase:
    """What one training phase adds to the step: trainable and forward masks (params-shaped),
    per-sample loss weights [index_bound], the task and the class mask."""

    trainable: Any
    masks: Any
    weights: Any
    task: Any
    cmask: Any


@dataclasses.dataclass(frozen=True)
class Setup(FromConfig):
    """Static values of one run (hashable: passed to jit as static arguments); the
    hyper-parameters are named as their `config.continual` keys."""

    model: Any
    tx: Any
    selection: str
    by_bn: bool  # task selection by the stem likelihood (continual.task_selection == 'bn')
    task_axis: str
    gce_q: float
    gamma: float
    alpha: float
    balance_groups: bool
    bias_score: str = "paper"  # continual.bias_score (`scores.BIAS_SCORES`)


def task_masks(backbone, channel_t, owner, t, packnet: bool):
    """The parameter mask of subnetwork t (traced or host): PackNet's weights owned by tasks
    <= t, or the channel masks of its units (broadcasting leaves)."""
    if packnet:
        return full_tree(jax.tree.map(lambda o: o <= t, owner), backbone)
    return structured.param_masks(backbone, units_of(channel_t))


def _at(tree, t):
    return jax.tree.map(lambda x: x[t], tree)


# --------------------------------------------------------------------------- jitted pieces
@functools.partial(jax.jit, static_argnames=("model", "tx", "gce_q", "mesh"), donate_argnums=0)
def train_step(state, batch, phase: Phase, *, model, tx, gce_q: float, mesh):
    """One step on task `phase.task`'s head: GCE(q) when gce_q > 0 (the biased model), else CE
    weighted by `phase.weights[index]`. Only `phase.trainable` weights move."""
    steps.check_batch(batch)

    def loss_fn(params):
        masked = apply_masks(params["backbone"], phase.masks)
        feats, new_stats = frame.features(model, masked, state.batch_stats, batch["image"],
                                          train=True)
        logits = jnp.take(frame.head_logits(feats, params["heads"], phase.cmask),
                          phase.task, axis=1)
        per = (losses.gce(logits, batch["label"], gce_q) if gce_q > 0
               else losses.cross_entropy(logits, batch["label"]))
        w = batch["valid"].astype(jnp.float32) * phase.weights[batch["index"]]
        return losses.weighted_mean(per, w), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(tx, grads, trainable=phase.trainable, batch_stats=new_stats)
    out = (state, {"loss": loss, "grad_norm": optax.tree.norm(grads)})
    return jax.lax.with_sharding_constraint(out, sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnames=("model", "gce_q"))
def score_batch(params, stats, task, cmask, batch, *, model, gce_q: float):
    """Per sample of a (sharded) batch: whether the biased model is right (bias-aligned), its
    GCE loss value (1 - p_y^q) / q in [0, 1/q], and every unit's spatially averaged post-ReLU
    activation (`act/<unit>`: [B, C]), from the model's sown intermediates."""
    steps.check_batch(batch)
    x = augment.normalize(batch["image"])
    (_, feats), inter = model.apply({"params": params["backbone"], "batch_stats": stats}, x,
                                    train=False, features=True, mutable=["intermediates"])
    logits = jnp.take(frame.head_logits(feats, params["heads"], cmask), task, axis=1)
    p_y = jnp.exp(-losses.cross_entropy(logits, batch["label"]))
    out = {"correct": jnp.argmax(logits, -1) == batch["label"],
           "gce": (1.0 - p_y**gce_q) / gce_q}
    for k, a in sown(inter["intermediates"]).items():
        out[f"act/{k}"] = jnp.mean(a.astype(jnp.float32), axis=(1, 2))
    return out


def stem_nll(h, mean, var, eps: float = 1e-5):
    """Per sample, the mean Gaussian negative log-likelihood (up to a constant) of activations
    h [B, H, W, C] under BatchNorm running statistics (mean, var [C]): how well the image
    matches the data those statistics were gathered on."""
    h = h.astype(jnp.float32)
    v = var.astype(jnp.float32) + eps
    return jnp.mean(0.5 * (h - mean) ** 2 / v + 0.5 * jnp.log(v), axis=(1, 2, 3))


def _record_first_bn(out: list):
    """A flax method interceptor: `stem_nll` of the input of the model's first BatchNorm call
    (the stem's), under that layer's running statistics, appended to `out`."""
    def interceptor(call, args, kwargs, context):
        if (not out and isinstance(context.module, nn.BatchNorm)
                and context.method_name == "__call__"):
            m = context.module
            out.append(stem_nll(args[0], m.get_variable("batch_stats", "mean"),
                                m.get_variable("batch_stats", "var"), m.epsilon))
        return call(*args, **kwargs)
    return interceptor


def _all_logits(state: Subnetworks, images, *, model, task_axis: str, packnet: bool):
    """Every subnetwork's logits [B, T, C_max] (absent classes at NEG) and its stem likelihood
    score [B, T] (`stem_nll` under its stored statistics), in one program."""
    x = augment.normalize(images)
    num_tasks = state.cmask.shape[0]

    def one(args):
        bn, stats, chan, kernel, bias, t = args
        masks = task_masks(state.backbone, chan, state.owner, t, packnet)
        params = apply_masks(with_bn(state.backbone, bn), masks)
        nll = []
        with nn.intercept_methods(_record_first_bn(nll)):
            _, feats = model.apply({"params": params, "batch_stats": stats}, x, train=False,
                                   features=True)
        return feats.astype(jnp.float32) @ kernel + bias, nll[0]

    logits, nll = over_stack(one, (state.task_bn, state.task_stats, state.channel,
                                   state.heads["kernel"], state.heads["bias"],
                                   jnp.arange(num_tasks)), task_axis)
    return (jnp.where(state.cmask[None], jnp.transpose(logits, (1, 0, 2)), frame.NEG),
            nll.T)


all_logits = jax.jit(_all_logits, static_argnames=("model", "task_axis", "packnet"))


@functools.partial(jax.jit, static_argnames=("model", "task_axis", "packnet", "by_bn"))
def predict_batch(state: Subnetworks, batch, valid_tasks, *, model, task_axis: str,
                  packnet: bool, by_bn: bool):
    """Task-agnostic inference of a global batch: all subnetworks, then task selection among
    `valid_tasks` by entropy or, `by_bn`, by the stem likelihood (`frame.decide`), in one
    program."""
    chex.assert_rank(batch["image"], 4)
    chex.assert_shape(valid_tasks, (state.cmask.shape[0],))
    logits, nll = _all_logits(state, batch["image"], model=model, task_axis=task_axis,
                              packnet=packnet)
    return frame.decide(logits, state.cmask, valid_tasks, nll if by_bn else None)


def predict(setup: Setup, state: Subnetworks, batch, *, valid_tasks):
    return predict_batch(state, batch, valid_tasks, model=setup.model,
                         task_axis=setup.task_axis, packnet=setup.selection == "packnet",
                         by_bn=setup.by_bn)


# ---------------------------------------------------------------------------------- build
def init(seq: frame.TaskSequence, selection: str) -> tuple[Setup, Subnetworks]:
    cfg = seq.config
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not cfg.model.name.startswith("resnet"):
        raise ValueError(f"config.model.name={cfg.model.name!r}: BiasPruner's units are ResNet "
                         "inner channels, use a resnet model")
    check_axis(cfg.continual.task_axis, "config.continual.task_axis")
    scores.check_kind(cfg.continual.get("bias_score", "paper"))
    model = build.build_model(cfg.model, 1)  # heads live outside the model
    rng = jax.random.PRNGKey(cfg.seed)
    v = build.init_variables(model, cfg.model, rng, seq.image_shape)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, features=True)[1], v,
                           jnp.zeros((1, *seq.image_shape)))
    t_max = seq.num_tasks
    backbone = jax.tree.map(np.asarray, v["params"])
    def stack(tree):  # one copy per task
        return jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], t_max, 0), tree)

    units = structured.resnet_units(backbone)
    state = Subnetworks(
        backbone=backbone,
        task_bn=stack(subset(backbone, is_bn)),
        task_stats=stack(v["batch_stats"]),
        heads=jax.device_get(frame.init_heads(jax.random.fold_in(rng, 1), t_max,
                                              feats.shape[-1], seq.max_classes)),
        channel=_unflat({u.name: np.ones((t_max, u.width), bool) for u in units}),
        owner=jax.tree.map(lambda x: np.full(np.shape(x), FREE, np.int32),
                           subset(backbone, is_shared_kernel)),
        cmask=seq.cmask,
        split_counts=np.zeros((t_max, 2), np.int32),
        stored=np.int32(0))
    # One optimizer for every phase (constant learning rate, as the reference's Adam); a fresh
    # optimizer state per phase.
    setup = Setup.from_config(cfg.continual, model=model, tx=build.make_optimizer(cfg.train, 1),
                              selection=selection,
                              by_bn=cfg.continual.task_selection == "bn")
    return setup, state


def trainable_masks(backbone, owner, owner_value, t: int, num_tasks: int) -> dict:
    """Shared kernels owned by `owner_value`, the task's own BN copy and its head."""
    flat_owner = _flat(owner)
    flat = {}
    for k in _flat(backbone):
        if is_shared_kernel(k):
            flat[k] = flat_owner[k] == owner_value
        else:
            flat[k] = np.full((), is_bn(k))
    head = (np.arange(num_tasks) == t)[:, None, None]
    return {"backbone": _unflat(flat), "heads": {"kernel": head, "bias": head[:, :, 0]}}


# ------------------------------------------------------------------------ the per-task cycle
def _phase(seq, t: int, cmask, trainable, masks, weights) -> Phase:
    return seq.replicate(Phase(trainable, masks, weights, np.int32(t), cmask))


def _step_with(seq, setup: Setup, ph: Phase, gce_q: float):
    return functools.partial(train_step, phase=ph, model=setup.model, tx=setup.tx,
                             gce_q=gce_q, mesh=seq.mesh)


def biased_phase(seq: frame.TaskSequence, setup: Setup, s: Subnetworks, t: int, workdir: str,
                 *, bn=None, stats=None):
    """Phase 1 of task t (host state `s`): the biased model, GCE (PackNet: CE) on the free
    weights, from task t's BatchNorm `bn` / `stats` (default: the stored copies at t).
    Returns its (params, batch_stats) on the host; `workdir/biased` holds its checkpoints."""
    cfg = seq.config
    packnet = setup.selection == "packnet"
    bn = _at(s.task_bn, t) if bn is None else bn
    stats = _at(s.task_stats, t) if stats is None else stats
    params = {"backbone": with_bn(s.backbone, bn), "heads": s.heads}
    mask_t = task_masks(params["backbone"], _at(s.channel, t), s.owner, t, packnet)
    all_units = jax.tree.map(lambda m: np.ones(np.shape(m), bool), mask_t)
    ts = frame.state_from(params, stats, setup.tx, jax.random.PRNGKey(cfg.seed + t))
    ph = _phase(seq, t, s.cmask,
                trainable_masks(params["backbone"], s.owner, FREE, t, seq.num_tasks),
                all_units, np.ones(seq.index_bound, np.float32))
    ts = frame.run_phase(seq, f"{workdir}/biased", ts,
                         _step_with(seq, setup, ph, 0.0 if packnet else setup.gce_q),
                         seq.tasks[t].splits["train"], cfg.continual.biased_epochs,
                         cfg.seed + 10 * t)
    return jax.device_get((ts.params, ts.batch_stats))


def train_task(seq: frame.TaskSequence, setup: Setup, state: Subnetworks, t: int,
               workdir: str) -> Subnetworks:
    """Phases 1-6 for task t (module docstring); returns the new state (host arrays)."""
    cfg = seq.config
    s = jax.device_get(state)
    source = seq.tasks[t].splits["train"]
    t_max = seq.num_tasks
    packnet = setup.selection == "packnet"
    task_bn, task_stats = jax.tree.map(np.copy, (s.task_bn, s.task_stats))
    if t > 0:  # task t starts from task t-1's BatchNorm
        for x in jax.tree.leaves((task_bn, task_stats)):
            x[t] = x[t - 1]
    channel, owner = jax.tree.map(np.copy, (s.channel, s.owner))
    ones = np.ones(seq.index_bound, np.float32)

    # 1. the biased (GCE; PackNet: CE) model on the free weights
    params, stats = biased_phase(seq, setup, s, t, workdir, bn=_at(task_bn, t),
                                 stats=_at(task_stats, t))
    split_counts = np.array(s.split_counts)

    # 2-4. scores -> the kept units / weights
    weights = ones
    if packnet:
        owner, params["backbone"] = select_packnet(owner, params["backbone"], t, setup.gamma)
    else:
        scored = score_pass(seq, setup, params, stats, t, s.cmask, source)
        if setup.selection == "bias":
            split_counts[t] = scored["counts"]
        kept = keep_units(setup.selection, setup.gamma, scored["scores"], params["backbone"])
        for name, m in kept.items():
            block, conv = name.split("/")
            channel[block][conv][t] = m
        keep = kept_weights(params["backbone"], kept)
        owner = jax.tree.map(lambda o, k: np.where((o == FREE) & k, t, o).astype(np.int32),
                             owner, keep)
        if setup.alpha > 0 or setup.balance_groups:
            weights = finetune_weights(scored["index"], scored["gce"], setup.alpha, ones, t,
                                       scored["correct"] if setup.balance_groups else None)

    # 5. fine-tune the subnetwork; only weights now owned by t change
    ts = frame.state_from(params, stats, setup.tx, jax.random.PRNGKey(cfg.seed + 100 + t))
    ph = _phase(seq, t, s.cmask, trainable_masks(params["backbone"], owner, t, t, t_max),
                task_masks(params["backbone"], _at(channel, t), owner, t, packnet), weights)
    ts = frame.run_phase(seq, f"{workdir}/finetune", ts, _step_with(seq, setup, ph, 0.0),
                         source, cfg.continual.finetune_epochs, cfg.seed + 10 * t + 1)

    # 6. store
    params, stats = jax.device_get((ts.params, ts.batch_stats))
    for dst, src in zip(jax.tree.leaves((task_bn, task_stats)),
                        jax.tree.leaves((subset(params["backbone"], is_bn), stats))):
        dst[t] = src
    return Subnetworks(backbone=params["backbone"], task_bn=task_bn, task_stats=task_stats,
                       heads=params["heads"], channel=channel, owner=owner, cmask=s.cmask,
                       split_counts=split_counts, stored=np.int32(t + 1))


def keep_units(selection: str, gamma: float, bias_scores: dict, backbone) -> dict:
    """{unit name: bool [C]} the channels subnetwork t keeps: 'bias' removes the gamma
    fraction with the HIGHEST bias score (most bias-aligned, the paper's direction; every
    `scores` variant is higher for more biased), ranked globally; the ablation 'magnitude'
    changes only the ranking (filter L1 norm, the lowest removed). No unit group is ever emptied."""
    if selection == "bias":
        return structured.channel_masks(bias_scores, gamma, prune="highest")
    l1 = jax.device_get(structured.filter_l1_scores(backbone))
    return structured.channel_masks(l1, gamma, prune="lowest")


def unit_pass(seq, setup: Setup, params, stats, t: int, cmask, source,
              keys: tuple[str, ...] = ("index", "label")) -> dict:
    """One sharded pass of `score_batch` over `source` (one fetch), samples in index order:
    `act/<unit>` [N, C], `correct`, `gce`, and the batch's `keys` (label: within-task)."""
    rep = seq.replicate((params, stats, np.int32(t), cmask))
    return predict_sharded(lambda b: score_batch(*rep, b, model=setup.model,
                                                 gce_q=setup.gce_q),
                           seq.batches(source), seq.mesh, keys=keys)


def score_pass(seq, setup: Setup, params, stats, t: int, cmask, source) -> dict:
    """`unit_pass` over `source`, then the bias score of every unit (`continual.bias_score`:
    the paper's mean activation over aligned minus over conflicting samples, or a variant,
    `scores`), the aligned / conflicting counts, and each sample's index, GCE loss and whether
    the GCE model is right (aligned)."""
    out = unit_pass(seq, setup, params, stats, t, cmask, source)
    easy = out["correct"].astype(bool)
    n_easy, n_hard = int(easy.sum()), int((~easy).sum())
    if n_easy == 0 or n_hard == 0:
        log.warning("bias scores: %d aligned and %d conflicting samples; a missing group "
                    "counts as zero activation", n_easy, n_hard)
    log.info("task %d: %d bias-aligned, %d bias-conflicting training samples", t, n_easy,
             n_hard)
    acts = {k[len("act/"):]: v for k, v in out.items() if k.startswith("act/")}
    return {"scores": scores.bias_scores(acts, easy, out["label"], setup.bias_score),
            "counts": (n_easy, n_hard), "index": out["index"],
            "gce": out["gce"], "correct": easy}


def finetune_weights(index, gce_loss, alpha: float, ones, t: int, aligned=None) -> np.ndarray:
    """exp(alpha * GCE loss) per training sample, in a table indexed by record index. With
    `aligned` (bool per sample: the GCE model is right) the misclassified samples' weights are
    then scaled so that both groups carry the same total weight (nothing changes when a group
    is empty)."""
    table = ones.copy()
    w = np.exp(alpha * np.asarray(gce_loss, np.float64))
    hard = None if aligned is None else ~np.asarray(aligned, bool)
    if hard is not None and hard.any() and not hard.all():
        w[hard] *= w[~hard].sum() / w[hard].sum()
    table[index] = w
    w = np.sort(table[index])[::-1]
    top = max(1, len(w) // 20)
    log.info("task %d fine-tune weights: median %.2f, max %.2f; the heaviest 5%% carry %.0f%% "
             "of the total", t, np.median(w), w[0], 100 * w[:top].sum() / w.sum())
    return table


def select_packnet(owner, backbone, t: int, gamma: float):
    """Keep the largest (1 - gamma) of each layer's free weights for task t; zero the rest
    (they stay free for later tasks). Returns (owner, backbone)."""
    flat_o, flat_p = _flat(owner), _flat(backbone)
    for k, o in flat_o.items():
        free = o == FREE
        n_free = int(free.sum())
        if n_free == 0:
            continue
        mag = np.where(free, np.abs(flat_p[k]), -1.0).ravel()
        n_prune = criteria.prune_count(gamma, n_free)
        order = np.argsort(mag, kind="stable")
        n_taken = int((~free).sum())
        prune = np.zeros(mag.size, bool)
        prune[order[n_taken:n_taken + n_prune]] = True
        prune = prune.reshape(o.shape)
        flat_o[k] = np.where(free & ~prune, t, o).astype(np.int32)
        flat_p[k] = np.where(free & prune, 0.0, flat_p[k]).astype(flat_p[k].dtype)
    return _unflat(flat_o), _unflat(flat_p)


# -------------------------------------------------------------------------------- report
def mask_report(state: Subnetworks, selection: str) -> dict:
    """Per task: units kept / owned, the overlap (IoU) of the subnetworks, and how many
    training samples the GCE model found bias-aligned / conflicting (bias selection only;
    zeros otherwise)."""
    t_max = int(state.stored)
    if selection == "packnet":
        owner = np.concatenate([np.ravel(o) for o in jax.tree.leaves(state.owner)])
        sets = [owner <= t for t in range(t_max)]
        owned = [int((owner == t).sum()) for t in range(t_max)]
        unit = "weights"
    else:
        chan = units_of(state.channel)
        sets = [np.concatenate([np.asarray(chan[k][t]) for k in sorted(chan)])
                for t in range(t_max)]
        first = np.full(sets[0].size, -1) if sets else np.zeros(0)
        for t in range(t_max - 1, -1, -1):
            first = np.where(sets[t], t, first)
        owned = [int((first == t).sum()) for t in range(t_max)]
        unit = "units"
    total = int(sets[0].size) if sets else 0
    iou = [[float((a & b).sum() / max((a | b).sum(), 1)) for b in sets] for a in sets]
    counts = np.asarray(state.split_counts)
    return {"unit": unit, "total": total, "kept": [int(s.sum()) for s in sets],
            "owned": owned, "iou": iou,
            "aligned": [int(v) for v in counts[:t_max, 0]],
            "conflicting": [int(v) for v in counts[:t_max, 1]]}


def method(selection: str) -> frame.Method:
    return frame.Method(
        build=functools.partial(init, selection=selection), train_task=train_task,
        predict=predict, mask_report=functools.partial(mask_report, selection=selection))
