"""EMA teacher (mean teacher / TEAR's theta_{t-1} stand-in).

Params follow theta_ema <- m theta_ema + (1 - m) theta (optax.incremental_update, TEAR spec
m = 0.999); BN statistics are copied from the student at each update (spec), not averaged.
The teacher is never differentiated: the step calls it under jax.lax.stop_gradient.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class EmaTeacher:
    params: Any
    batch_stats: Any

    @classmethod
    def init(cls, params, batch_stats) -> "EmaTeacher":
        """A copy of the student: fresh buffers, so donating the train state never donates
        one buffer twice."""
        return cls(params=jax.tree.map(jnp.copy, params),
                   batch_stats=jax.tree.map(jnp.copy, batch_stats))

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def ema_teacher_update(teacher: EmaTeacher, params, batch_stats,
                       momentum: float = 0.999) -> EmaTeacher:
    """One EMA step towards the student's (params, batch_stats)."""
    return EmaTeacher(
        params=optax.incremental_update(params, teacher.params, step_size=1.0 - momentum),
        batch_stats=jax.tree.map(lambda x: x, batch_stats))
