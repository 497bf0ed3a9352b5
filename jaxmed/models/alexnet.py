"""AlexNet in flax.linen, torchvision's variant (64-192-384-256-256 convs, adaptive 6x6 pool,
4096-4096 classifier with dropout). Module names follow torchvision's indices
(`features_0`, `classifier_6`) for checkpoint conversion. Each conv's post-ReLU output is sown
into `intermediates` (`features_0`, ...)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.models.common import conv, dense, outputs, sow_activation


def adaptive_avg_pool(x, out_hw: tuple[int, int]):
    """PyTorch's AdaptiveAvgPool2d on NHWC: bin i spans [floor(i*H/o), ceil((i+1)*H/o))."""
    def pool_axis(x, axis, out):
        size = x.shape[axis]
        if size == out:
            return x
        bins = []
        for i in range(out):
            lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
            bins.append(jnp.mean(jnp.take(x, jnp.arange(lo, hi), axis=axis), axis=axis,
                                 keepdims=True))
        return jnp.concatenate(bins, axis=axis)
    return pool_axis(pool_axis(x, 1, out_hw[0]), 2, out_hw[1])


class AlexNet(nn.Module):
    num_classes: int = 1000
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x = jnp.asarray(x, self.dtype)
        plan = [(0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, False),
                (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, True)]
        for idx, ch, k, s, p, pool in plan:
            x = nn.relu(conv(ch, k, s, padding=p, use_bias=True, name=f"features_{idx}",
                             dtype=self.dtype)(x))
            sow_activation(self, f"features_{idx}", x)
            if pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = adaptive_avg_pool(x, (6, 6))
        # Flatten in PyTorch's (C, H, W) order so converted classifier weights line up.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        for idx in (1, 4):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = nn.relu(dense(4096, name=f"classifier_{idx}", dtype=self.dtype)(x))
        feats = x
        logits = dense(self.num_classes, name="classifier_6", dtype=self.dtype)(x)
        return outputs(logits.astype(jnp.float32), feats.astype(jnp.float32), features)


def alexnet(**kw):
    return AlexNet(**kw)
