"""Functions over a stacked pytree (model copies on a leading axis: sparsity levels, tasks'
subnetworks, seeds) inside one compiled program."""

from __future__ import annotations

from typing import Callable

import jax

AXES = ("vmap", "map")


def check_axis(axis: str, key: str) -> None:
    if axis not in ("vmap", "map"):
        raise ValueError(f"{key} must be 'vmap' or 'map', got {axis!r}")


def over_stack(fn: Callable, stacked, axis: str):
    """fn over the leading axis of a stacked pytree (model copies: sparsity levels, tasks'
    subnetworks) inside one program: 'vmap' batches them (convolutions become grouped ones),
    'map' runs them one after another (`lax.map`), each a dense forward."""
    return jax.vmap(fn)(stacked) if axis == "vmap" else jax.lax.map(fn, stacked)
