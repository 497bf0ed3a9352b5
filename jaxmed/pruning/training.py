"""Pruning during training: a state hook that recomputes masks when the schedule says so.

Masks exist (all True) from the first step, so the train step compiles once: pruning only
changes mask values, never the state's structure. Pruned weights are zeroed at the event and
kept at zero by `masked_optimizer`.
"""

from __future__ import annotations

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


class ScheduledPruning:
    """state_hook(step, state) -> state for `train_loop`."""

    def __init__(self, cfg, writer=None):
        if cfg.criterion not in ("magnitude", "random"):
            raise ValueError(f"config.pruning.criterion={cfg.criterion!r}: use magnitude / random "
                             "(or none)")
        if cfg.scope not in ("global", "layer"):
            raise ValueError(f"config.pruning.scope={cfg.scope!r}: use global / layer")
        if cfg.distribution not in ("uniform", "erk"):
            raise ValueError(f"config.pruning.distribution={cfg.distribution!r}: use uniform / "
                             "erk")
        self.cfg, self.writer = cfg, writer
        self.schedule = schedules.make_schedule(cfg.schedule, target=cfg.target,
                                                start=cfg.start_step, end=cfg.end_step,
                                                frequency=cfg.frequency, initial=cfg.initial)
        self._compute = jax.jit(self._masks)

    @staticmethod
    def initial_masks(params):
        return build_masks(params)

    def _masks(self, params, masks, counts, rng):
        if self.cfg.criterion == "magnitude":
            scores = criteria.magnitude_scores(apply_masks(params, masks))
        else:
            scores = criteria.random_scores(params, rng)
        # Weights already pruned score below everything: they stay pruned.
        scores = jax.tree.map(lambda s, m: None if s is None else jnp.where(m, s, -1.0),
                              scores, masks, is_leaf=_is_none)
        return criteria.masks_at_counts(scores, counts, self.cfg.scope)

    def counts(self, params, target: float):
        """Weights to prune at `target` (host ints, so the jitted step never recompiles)."""
        scoped = criteria.select(params)
        if self.cfg.scope == "global":
            return jnp.int32(criteria.prune_count(target, criteria.num_scored(scoped)))
        dist = (criteria.erk_distribution if self.cfg.distribution == "erk"
                else criteria.uniform_distribution)
        return jax.tree.map(lambda k: None if k is None else jnp.int32(k),
                            criteria.layer_counts(scoped, dist(params, target)), is_leaf=_is_none)

    def __call__(self, step: int, state):
        target = self.schedule(step)
        if target is None:
            return state
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), step)
        masks = self._compute(state.params, state.masks, self.counts(state.params, target), rng)
        state = state.replace(masks=masks, params=apply_masks(state.params, masks))
        achieved = sparsity(jax.device_get(masks))
        log.info("step %d: pruned to sparsity %.4f (target %.4f)", step, achieved, target)
        if self.writer is not None:
            self.writer.write(step, {"train/sparsity": achieved})
        return state


