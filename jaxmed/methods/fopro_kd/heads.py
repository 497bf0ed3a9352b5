"""The EKD student's extra heads on its 512-d feature h (the backbone keeps its own `fc`):
projector p = Linear(h, hidden) -> BN -> ReLU -> Linear(hidden, D_teacher), as the authors'
`p_free`, and fc_p = Linear(D_teacher, C) on p(h). Names follow torch's nn.Sequential
(`p_0`, `p_1`, `p_3`) so `convert.py`-style loading of a Fed-MAS student stays by name.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.models.common import batch_norm, dense


class ProjectorHeads(nn.Module):
    teacher_dim: int
    num_classes: int
    hidden: int = 512
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool = False):
        """h (B, F) -> {'proj': p(h) (B, D), 'proj_logits': fc_p(p(h)) (B, C)}, float32."""
        y = dense(self.hidden, name="p_0", dtype=self.dtype)(jnp.asarray(h, self.dtype))
        y = nn.relu(batch_norm(train, name="p_1", dtype=self.dtype)(y))
        proj = dense(self.teacher_dim, name="p_3", dtype=self.dtype)(y)
        logits = dense(self.num_classes, name="fc_p", dtype=self.dtype)(proj)
        return {"proj": proj.astype(jnp.float32), "proj_logits": logits.astype(jnp.float32)}
