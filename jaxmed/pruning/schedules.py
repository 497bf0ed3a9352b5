"""When to prune and how much: one-shot, gradual (Zhu & Gupta 2017) and iterative magnitude
pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

A schedule is a function step -> target sparsity or None (None: do not prune at this step), so
a trainer asks it once per step on the host and recomputes masks only when it says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jaxmed.pruning import criteria
from jaxmed.pruning.masks import Mask, apply_masks, sparsity as mask_sparsity


@dataclasses.dataclass(frozen=True)
class OneShot:
    """Prune to `target` once, at step `at`."""

    target: float
    at: int = 0

    def __call__(self, step: int) -> float | None:
        return self.target if step == self.at else None

    def final_sparsity(self) -> float:
        return self.target


@dataclasses.dataclass(frozen=True)
class Gradual:
    """Zhu & Gupta cubic schedule: at t = t0 + k dt (k = 0..n),
    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3; no pruning between those steps."""

    initial: float
    final: float
    start: int
    num_steps: int  # n: number of pruning events after the first
    frequency: int  # dt

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        span = self.num_steps * self.frequency
        frac = min(max((step - self.start) / span, 0.0), 1.0) if span else 1.0
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def __call__(self, step: int) -> float | None:
        k, rem = divmod(step - self.start, self.frequency)
        if step < self.start or rem or k > self.num_steps:
            return None
        return self.sparsity_at(step)

    def final_sparsity(self) -> float:
        return self.final


def make_schedule(kind: str, *, target: float, start: int, end: int, frequency: int,
                  initial: float = 0.0):
    """Config -> schedule: 'one_shot' prunes at `start`; 'gradual' from `start` to `end`."""
    if kind == "one_shot":
        return OneShot(target, start)
    if kind == "gradual":
        if end <= start or frequency <= 0:
            raise ValueError(f"gradual pruning needs end > start and frequency > 0, got "
                             f"start={start} end={end} frequency={frequency}")
        return Gradual(initial, target, start, (end - start) // frequency, frequency)
    raise ValueError(f"unknown pruning schedule {kind!r}: use one_shot / gradual")


@dataclasses.dataclass
class ImpRound:
    masks: Mask
    sparsity: float
    trained: Any  # params at the end of the round's training


def iterative_magnitude_pruning(train: Callable[[Any, Mask], Any], init_params, *,
                                rounds: int, rate: float, rewind_params=None,
                                scope: str = "global",
                                predicate=criteria.default_predicate) -> list[ImpRound]:
    """Lottery-ticket IMP: train, prune `rate` of the remaining weights by magnitude, rewind
    the surviving weights to `rewind_params` (default: the initialisation; Frankle et al. 2020
    rewind to an early-training checkpoint), train again; `rounds` times.

    train(params, masks) -> trained params (masks are respected by the caller's optimizer,
    e.g. `masked_optimizer`). After round r the sparsity is 1 - (1 - rate)^r."""
    rewind = init_params if rewind_params is None else rewind_params
    masks = criteria.magnitude_masks(init_params, [0.0], scope, predicate)[0]
    params = init_params
    history = []
    for r in range(1, rounds + 1):
        trained = train(params, masks)
        target = 1.0 - (1.0 - rate) ** r
        scores = criteria.magnitude_scores(apply_masks(trained, masks), predicate)
        # Pruned weights score -1 so they stay pruned (they are the lowest).
        scores = jax.tree.map(lambda s, m: None if s is None else jax.numpy.where(m, s, -1.0),
                              scores, masks, is_leaf=lambda x: x is None)
        masks = criteria.masks_from_scores(scores, target, scope)
        params = apply_masks(rewind, masks)
        history.append(ImpRound(masks, mask_sparsity(masks), trained))
    return history
