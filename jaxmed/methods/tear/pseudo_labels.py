"""Pseudo labels and distribution alignment (USB's PseudoLabelingHook and DistAlign hooks).

Inputs are the weak view's probabilities, already stop-gradient. `valid` (B,) bool marks real
rows: padded rows of a short batch never move a running statistic, and a batch with no valid
row leaves the state unchanged. States are per-dataset pytrees carried in the train state.
"""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp


def valid_mean(x, valid=None):
    """Mean over axis 0 of the rows where `valid` (all rows when None); 0 when none is valid."""
    if valid is None:
        return jnp.mean(x, axis=0)
    chex.assert_equal_shape_prefix([x, valid], 1)
    w = valid.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(x * w, axis=0) / jnp.maximum(jnp.sum(valid.astype(x.dtype)), 1.0)


def any_valid(valid):
    """Whether the batch has a real row (True when `valid` is None)."""
    return jnp.asarray(True) if valid is None else jnp.any(valid)


def hard_pseudo_label(probs):
    """(B,) int32 argmax labels (FixMatch, FlexMatch, FreeMatch, SoftMatch with hard labels)."""
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)


def soft_pseudo_label(logits, temperature: float = 1.0):
    """softmax(logits / T): USB's soft target (T = 1: the plain prediction)."""
    return jax.nn.softmax(jax.lax.stop_gradient(logits) / temperature, axis=-1)


def sharpen(probs, temperature: float = 0.5):
    """p^(1/T) renormalised (MixMatch / ReMixMatch; TEAR's DA variant uses T = 0.5)."""
    logp = jnp.log(jnp.maximum(probs, 1e-12))
    return jax.nn.softmax(logp / temperature, axis=-1)


# ------------------------------------------------------------------ TEAR / CoMatch DA queue
@flax.struct.dataclass
class DAQueue:
    """Ring buffer of the last `length` batch-mean predictions (TEAR reference: 32)."""
    means: jax.Array  # (length, C) float32
    count: jax.Array  # () int32, batches pushed so far (slot = count % length)

    @classmethod
    def init(cls, num_classes: int, length: int = 32) -> "DAQueue":
        if num_classes < 2 or length < 1:
            raise ValueError(f"DAQueue.init: num_classes={num_classes}, length={length}")
        return cls(means=jnp.zeros((length, num_classes), jnp.float32),
                   count=jnp.zeros((), jnp.int32))


def da_queue_update(state: DAQueue, probs, valid=None) -> DAQueue:
    """Push the valid rows' mean prediction; a batch without valid rows pushes nothing."""
    chex.assert_rank(probs, 2)
    chex.assert_axis_dimension(probs, 1, state.means.shape[1])
    push = any_valid(valid)
    slot = state.count % state.means.shape[0]
    means = state.means.at[slot].set(
        jnp.where(push, valid_mean(probs, valid).astype(state.means.dtype), state.means[slot]))
    return DAQueue(means=means, count=state.count + push.astype(jnp.int32))


def da_queue_mean(state: DAQueue):
    """Mean of the filled slots (uniform before the first push)."""
    length, num_classes = state.means.shape
    filled = jnp.arange(length) < jnp.minimum(state.count, length)
    mean = valid_mean(state.means, filled)
    return jnp.where(state.count > 0, mean, jnp.full((num_classes,), 1.0 / num_classes))


def da_queue_align(state: DAQueue, probs, target=None, temperature: float | None = None):
    """probs / queue mean, renormalised (TEAR default). Variant: `target` (C,) the labeled
    marginal multiplies in (ReMixMatch) and `temperature` sharpens (spec: T = 0.5)."""
    ratio = 1.0 / jnp.maximum(da_queue_mean(state), 1e-12)
    if target is not None:
        ratio = ratio * jnp.asarray(target, probs.dtype)
    aligned = probs * ratio
    aligned = aligned / jnp.sum(aligned, axis=-1, keepdims=True)
    return aligned if temperature is None else sharpen(aligned, temperature)


def distribution_alignment(state: DAQueue, probs, valid=None, target=None,
                           temperature: float | None = None):
    """TEAR's DA in the reference's order: push this batch's mean first, then align by the
    queue that includes it. Returns (new state, aligned probs)."""
    state = da_queue_update(state, probs, valid)
    return state, da_queue_align(state, probs, target, temperature)


# ------------------------------------------------------------ SoftMatch uniform alignment
@flax.struct.dataclass
class UniformAlignState:
    """USB's DistAlignEMAHook(p_target_type='uniform'): EMA of the mean prediction."""
    p_model: jax.Array  # (C,) EMA of batch-mean unlabeled probs (first batch: its mean)
    p_target: jax.Array  # (C,) uniform (or a given marginal)
    count: jax.Array  # () int32 updates so far

    @classmethod
    def init(cls, num_classes: int, p_target=None) -> "UniformAlignState":
        target = (jnp.full((num_classes,), 1.0 / num_classes, jnp.float32) if p_target is None
                  else jnp.asarray(p_target, jnp.float32))
        chex.assert_shape(target, (num_classes,))
        return cls(p_model=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
                   p_target=target, count=jnp.zeros((), jnp.int32))


def uniform_align_update(state: UniformAlignState, probs, valid=None,
                         momentum: float = 0.999) -> UniformAlignState:
    """p_model <- m p_model + (1 - m) mean(probs); USB sets it to the first batch's mean.
    USB default momentum (`ema_p`) 0.999."""
    chex.assert_axis_dimension(probs, 1, state.p_model.shape[0])
    push = any_valid(valid)
    mean = valid_mean(probs, valid).astype(state.p_model.dtype)
    ema = jnp.where(state.count > 0, momentum * state.p_model + (1 - momentum) * mean, mean)
    return state.replace(p_model=jnp.where(push, ema, state.p_model),
                         count=state.count + push.astype(jnp.int32))


def uniform_align(state: UniformAlignState, probs):
    """probs * (p_target + 1e-6) / (p_model + 1e-6), renormalised (USB). SoftMatch uses the
    aligned probs for its weights only; its pseudo labels come from the raw logits."""
    aligned = probs * (state.p_target + 1e-6) / (state.p_model + 1e-6)
    return aligned / jnp.sum(aligned, axis=-1, keepdims=True)
