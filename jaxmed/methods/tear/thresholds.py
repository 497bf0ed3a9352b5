"""Confidence masks and sample weights: FixMatch, FlexMatch, FreeMatch, SoftMatch.

USB's MaskingHooks as pure functions. Masks / weights are float (B,) in [0, 1], computed on
stop-gradient weak-view probabilities; the caller multiplies them into the per-sample
unlabeled loss. Order per USB: FlexMatch masks with the status *before* this batch writes
its memory; FreeMatch and SoftMatch update their EMAs with this batch first, then mask.
"""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp

from jaxmed.methods.tear.pseudo_labels import any_valid, valid_mean


def fixed_threshold_mask(probs, threshold: float = 0.95):
    """FixMatch: max prob >= threshold (paper and TEAR spec: 0.95)."""
    return (jnp.max(probs, axis=-1) >= threshold).astype(probs.dtype)


def scatter_rows(memory, index, valid, values):
    """memory[index[b]] = values[b] for the valid rows; invalid rows write nothing (their
    index is sent out of bounds and dropped). With duplicate indices one write wins."""
    chex.assert_rank(index, 1)
    target = index if valid is None else jnp.where(valid, index, memory.shape[0])
    return memory.at[target].set(values.astype(memory.dtype), mode="drop")


# ------------------------------------------------------------------------------ FlexMatch
@flax.struct.dataclass
class FlexMatchState:
    """Curriculum pseudo labelling (Zhang et al. 2021), USB's FlexMatchThresholdingHook."""
    selected: jax.Array  # (num_slots,) int32: last confident class per stable index, -1 never
    num_unlabeled: jax.Array  # () int32: unlabeled records (USB's ulb_dest_len)

    @classmethod
    def init(cls, num_slots: int, num_unlabeled: int | None = None) -> "FlexMatchState":
        """`num_slots`: the dataset's index bound (indices of labeled records may share the
        space and are simply never written); `num_unlabeled` defaults to `num_slots`."""
        num_unlabeled = num_slots if num_unlabeled is None else num_unlabeled
        if not 0 < num_unlabeled <= num_slots:
            raise ValueError(f"FlexMatchState.init: num_unlabeled={num_unlabeled} must be in "
                             f"(0, num_slots={num_slots}]")
        return cls(selected=jnp.full((num_slots,), -1, jnp.int32),
                   num_unlabeled=jnp.asarray(num_unlabeled, jnp.int32))


def flexmatch_learning_status(state: FlexMatchState, num_classes: int, warmup: bool = True):
    """sigma_c / max(max_c sigma_c, N_unused) (warmup) or sigma_c / max_c sigma_c (USB).

    Differs from USB in one corner only: USB skips the update once one class holds every
    record; here the formula is applied (status 1 for that class)."""
    sel = state.selected
    counts = jnp.zeros((num_classes + 1,), jnp.float32).at[
        jnp.where(sel >= 0, sel, num_classes)].add(1.0)[:num_classes]
    denom = jnp.max(counts)
    if warmup:
        unused = state.num_unlabeled.astype(jnp.float32) - jnp.sum(counts)
        denom = jnp.maximum(denom, unused)
    return counts / jnp.maximum(denom, 1.0)


def convex_mapping(x):
    """USB's default FlexMatch mapping M(x) = x / (2 - x)."""
    return x / (2.0 - x)


def flexmatch_mask(state: FlexMatchState, probs, p_cutoff: float = 0.95,
                   warmup: bool = True):
    """max prob >= p_cutoff * M(status[argmax]); USB defaults p_cutoff 0.95, warmup on."""
    status = flexmatch_learning_status(state, probs.shape[-1], warmup)
    maxp, pred = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)
    return (maxp >= p_cutoff * convex_mapping(status[pred])).astype(probs.dtype)


def flexmatch_update(state: FlexMatchState, probs, index, valid=None,
                     p_cutoff: float = 0.95) -> FlexMatchState:
    """Record argmax for the valid rows whose max prob >= p_cutoff (the fixed cutoff)."""
    chex.assert_equal_shape_prefix([probs, index], 1)
    select = jnp.max(probs, axis=-1) >= p_cutoff
    select = select if valid is None else select & valid
    return state.replace(selected=scatter_rows(
        state.selected, index, select, jnp.argmax(probs, axis=-1)))


# ------------------------------------------------------------------------------ FreeMatch
@flax.struct.dataclass
class FreeMatchState:
    """Self-adaptive thresholds (Wang et al. 2023), USB's FreeMatchThresholingHook."""
    time_p: jax.Array  # () EMA of the batch mean of max prob (global threshold tau_t)
    p_model: jax.Array  # (C,) EMA of the batch mean prob vector (local p~_t)
    label_hist: jax.Array  # (C,) EMA of the argmax histogram (fairness term's h~_t)

    @classmethod
    def init(cls, num_classes: int) -> "FreeMatchState":
        """tau_0 = p~_0 = h~_0 = 1/C: the paper's init and USB's since April 2023 (commit
        9a24e00, 2023-04-16: p_model = label_hist = ones / C, time_p = p_model.mean(); from
        2023-02-09 to then USB started p_model and label_hist at 1, so time_p at 1). The
        global threshold therefore rises from 1/C: early in training FreeMatch admits almost
        every unlabeled sample, before the model is confident."""
        u = lambda: jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)  # noqa: E731
        # two buffers: a donated state must not hold one buffer twice
        return cls(time_p=jnp.asarray(1.0 / num_classes, jnp.float32), p_model=u(),
                   label_hist=u())


def freematch_update(state: FreeMatchState, probs, valid=None,
                     momentum: float = 0.999) -> FreeMatchState:
    """EMAs over the valid rows (paper/USB momentum 0.999; USB's use_quantile and
    clip_thresh are off by default and not implemented)."""
    num_classes = state.p_model.shape[0]
    chex.assert_axis_dimension(probs, 1, num_classes)
    m = momentum
    maxp = jnp.max(probs, axis=-1)
    hist = valid_mean(jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_classes, dtype=probs.dtype),
                      valid)
    new = FreeMatchState(
        time_p=m * state.time_p + (1 - m) * valid_mean(maxp, valid),
        p_model=m * state.p_model + (1 - m) * valid_mean(probs, valid),
        label_hist=m * state.label_hist + (1 - m) * hist)
    keep = any_valid(valid)
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b).astype(b.dtype), new, state)


def freematch_mask(state: FreeMatchState, probs):
    """max prob >= tau_t * MaxNorm(p~_t)[argmax] (local threshold normalised by its max)."""
    local = state.p_model / jnp.max(state.p_model)
    maxp, pred = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)
    return (maxp >= state.time_p * local[pred]).astype(probs.dtype)


# ------------------------------------------------------------------------------ SoftMatch
@flax.struct.dataclass
class SoftMatchState:
    """Truncated-Gaussian weighting (Chen et al. 2023), USB's SoftMatchWeightingHook with
    per_class=False (its default)."""
    mu: jax.Array  # () EMA of the batch mean of max prob, init 1/C
    var: jax.Array  # () EMA of the batch unbiased variance of max prob, init 1

    @classmethod
    def init(cls, num_classes: int) -> "SoftMatchState":
        return cls(mu=jnp.asarray(1.0 / num_classes, jnp.float32),
                   var=jnp.asarray(1.0, jnp.float32))


def softmatch_update(state: SoftMatchState, probs, valid=None,
                     momentum: float = 0.999) -> SoftMatchState:
    """EMA of mean and unbiased variance of max prob over valid rows (USB ema_p 0.999).
    Fewer than two valid rows (variance undefined) leave the state unchanged."""
    maxp = jnp.max(probs, axis=-1)
    w = jnp.ones_like(maxp) if valid is None else valid.astype(maxp.dtype)
    n = jnp.sum(w)
    mean = jnp.sum(w * maxp) / jnp.maximum(n, 1.0)
    var = jnp.sum(w * (maxp - mean) ** 2) / jnp.maximum(n - 1.0, 1.0)
    ok = n >= 2
    m = momentum
    return SoftMatchState(mu=jnp.where(ok, m * state.mu + (1 - m) * mean, state.mu),
                          var=jnp.where(ok, m * state.var + (1 - m) * var, state.var))


def softmatch_weights(state: SoftMatchState, probs, n_sigma: float = 2.0):
    """exp(-min(p_max - mu, 0)^2 / (2 var / n_sigma^2)): 1 above the mean (USB n_sigma 2)."""
    gap = jnp.minimum(jnp.max(probs, axis=-1) - state.mu, 0.0)
    return jnp.exp(-(gap ** 2) / (2.0 * state.var / n_sigma ** 2))
