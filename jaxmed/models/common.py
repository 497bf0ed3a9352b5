"""Layers and the output convention shared by jaxmed's models."""

from __future__ import annotations

from typing import Any

import flax
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


def outputs(logits, feats, features: bool):
    """Every model returns `logits`, or `(logits, feats)` with `features=True`. Intermediate
    activations are never returned: models `sow` them into the `intermediates` collection."""
    return (logits, feats) if features else logits


ACT = "_act"  # sown names: a module cannot sow under its own submodule's name ('conv1')


def sow_activation(module: nn.Module, name: str, value) -> None:
    """Sow the activation of the layer `name` (e.g. the post-ReLU output of `conv1`)."""
    module.sow("intermediates", name + ACT, value)


def sown(intermediates) -> dict:
    """The `intermediates` collection of `model.apply(..., mutable=["intermediates"])` as
    {'layer1_0/conv1': activation}: module path joined by '/', named for the layer that made
    it (each sown tuple holds one value per call; models call each module once)."""
    flat = flax.traverse_util.flatten_dict(dict(intermediates), sep="/")
    return {k.removesuffix(ACT): v[-1] for k, v in flat.items()}
