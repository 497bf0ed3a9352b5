"""Layers and the output convention shared by jaxmed's models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, *, name: str, dtype: Any,
         padding: int | None = None, use_bias: bool = False) -> nn.Conv:
    """A conv with PyTorch's symmetric padding (default k // 2), so strided convs match."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=use_bias, kernel_init=conv_init,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def batch_norm(train: bool, *, name: str, dtype: Any) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 == flax 0.9, eps 1e-5).

    Statistics are reduced in float32 even when `dtype` is bfloat16 (flax's default)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, param_dtype=jnp.float32, name=name)


def dense(features: int, *, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def pack_outputs(logits, feats, acts, features: bool, capture: bool):
    """Every model returns `logits`, `(logits, feats)`, `(logits, acts)` or
    `(logits, feats, acts)` depending on the `features` / `capture` flags."""
    out = (logits,)
    if features:
        out += (feats,)
    if capture:
        out += (acts,)
    return out[0] if len(out) == 1 else out
