"""Pruning during training: a state hook that recomputes masks when the schedule says so.

Masks exist (all True) from the first step, so the train step compiles once: pruning only
changes mask values, never the state's structure. Pruned weights are zeroed at the event and
kept at zero by `masked_optimizer`.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections

from jaxmed.pruning import criteria, schedules
from jaxmed.pruning.masks import _is_none, apply_masks, build_masks, sparsity

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        criterion="none",  # 'none', 'magnitude' or 'random' (SNIP: criteria.snip_scores)
        scope="global",  # 'global' ranking, or 'layer' (with `distribution`)
        distribution="uniform",  # per-layer sparsities for scope 'layer': 'uniform' / 'erk'
        schedule="one_shot",  # 'one_shot' (at start_step) or 'gradual' (start..end)
        target=0.0, initial=0.0, start_step=0, end_step=0, frequency=100, seed=0,
    ))


def initial_masks(params):
    """All-True masks: they exist from the first step so the train step compiles once."""
    return build_masks(params)


@functools.partial(jax.jit, static_argnames=("criterion", "scope"))
def recompute_masks(params, masks, counts, rng, *, criterion: str, scope: str):
    """Masks pruning `counts` weights (one int for a global scope, a pytree per layer) by
    `criterion`; weights already pruned score below everything, so they stay pruned."""
    if criterion == "magnitude":
        scores = criteria.magnitude_scores(apply_masks(params, masks))
    else:
        scores = criteria.random_scores(params, rng)
    scores = jax.tree.map(lambda s, m: None if s is None else jnp.where(m, s, -1.0),
                          scores, masks, is_leaf=_is_none)
    return criteria.masks_at_counts(scores, counts, scope)


class ScheduledPruning:
    """state_hook(step, state) -> state for `train_loop`: at the schedule's events, new masks
    from `recompute_masks` (a module-level jitted function; this object only holds the
    schedule and the writer)."""

    def __init__(self, cfg, writer=None):
        if cfg.criterion not in ("magnitude", "random"):
            raise ValueError(f"config.pruning.criterion={cfg.criterion!r}: use magnitude / random "
                             "(or none)")
        if cfg.scope not in ("global", "layer"):
            raise ValueError(f"config.pruning.scope={cfg.scope!r}: use global / layer")
        if cfg.distribution not in ("uniform", "erk"):
            raise ValueError(f"config.pruning.distribution={cfg.distribution!r}: use uniform / "
                             "erk")
        self.criterion, self.scope, self.distribution = cfg.criterion, cfg.scope, cfg.distribution
        self.seed, self.writer = cfg.seed, writer
        self.schedule = schedules.make_schedule(cfg.schedule, target=cfg.target,
                                                start=cfg.start_step, end=cfg.end_step,
                                                frequency=cfg.frequency, initial=cfg.initial)

    def counts(self, params, target: float):
        """Weights to prune at `target` (host ints, so the jitted step never recompiles)."""
        scoped = criteria.select(params)
        if self.scope == "global":
            return jnp.int32(criteria.prune_count(target, criteria.num_scored(scoped)))
        dist = (criteria.erk_distribution if self.distribution == "erk"
                else criteria.uniform_distribution)
        return jax.tree.map(lambda k: None if k is None else jnp.int32(k),
                            criteria.layer_counts(scoped, dist(params, target)), is_leaf=_is_none)

    def __call__(self, step: int, state):
        target = self.schedule(step)
        if target is None:
            return state
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        masks = recompute_masks(state.params, state.masks, self.counts(state.params, target),
                                rng, criterion=self.criterion, scope=self.scope)
        state = state.replace(masks=masks, params=apply_masks(state.params, masks))
        achieved = sparsity(jax.device_get(masks))
        log.info("step %d: pruned to sparsity %.4f (target %.4f)", step, achieved, target)
        if self.writer is not None:
            self.writer.write(step, {"train/sparsity": achieved})
        return state
