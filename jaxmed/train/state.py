"""The training state: one pytree, so it can be jitted, donated, sharded and checkpointed."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    masks: Any  # None, or a mask pytree with the params' structure (jaxmed.pruning)
    rng: jax.Array  # raw uint32 key: checkpoints as a plain array
    # None, or float32 [index_bound]: a loss weight per record's stable index, for methods that
    # reweigh samples during training (HTL's attention; TEAR's step weighs unlabeled terms)
    sample_weight: Any = None

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation, rng: jax.Array,
               masks: Any = None, index_bound: int = 0) -> "TrainState":
        """index_bound > 0: a weight-1 `sample_weight` table of that many entries."""
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                   masks=masks, rng=rng,
                   sample_weight=jnp.ones((index_bound,), jnp.float32) if index_bound else None)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def apply_gradients(self, tx: optax.GradientTransformation, grads, *, trainable=None,
                        **changes) -> "TrainState":
        """One optimizer update. With a `jaxmed.pruning.masks.masked_optimizer`, pruned weights
        (self.masks) stay exactly zero and weights outside `trainable` stay bitwise frozen."""
        extra = {}
        if isinstance(tx, optax.GradientTransformationExtraArgs):
            extra = {"masks": self.masks, "trainable": trainable}
        elif self.masks is not None or trainable is not None:
            raise ValueError("masks / trainable need an optimizer built with masked_optimizer")
        updates, opt_state = tx.update(grads, self.opt_state, self.params, **extra)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)
