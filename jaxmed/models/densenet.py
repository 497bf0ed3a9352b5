"""DenseNet-121 in flax.linen with torchvision's layout (`conv0`, `denseblock1/denselayer1/...`,
`transition1`, `norm5`, `classifier`), so torchvision checkpoints convert by name.

The post-ReLU output of each dense layer's 1x1 bottleneck conv, the layer's prunable width, is
sown into `intermediates` (`common.sown` keys: `denseblock1_denselayer1/conv1`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.models.common import batch_norm, conv, dense, outputs, sow_activation


class DenseLayer(nn.Module):
    growth: int
    bn_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.relu(batch_norm(train, name="norm1", dtype=self.dtype)(x))
        y = conv(self.bn_size * self.growth, 1, name="conv1", dtype=self.dtype)(y)
        y = nn.relu(batch_norm(train, name="norm2", dtype=self.dtype)(y))
        sow_activation(self, "conv1", y)
        y = conv(self.growth, 3, name="conv2", dtype=self.dtype)(y)
        return jnp.concatenate([x, y], axis=-1)


class DenseNet(nn.Module):
    block_config: Sequence[int] = (6, 12, 24, 16)
    growth: int = 32
    init_features: int = 64
    bn_size: int = 4
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x = jnp.asarray(x, self.dtype)
        x = conv(self.init_features, 7, 2, name="conv0", dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, name="norm0", dtype=self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for b, n in enumerate(self.block_config):
            for i in range(n):
                x = DenseLayer(self.growth, self.bn_size, self.dtype,
                               name=f"denseblock{b + 1}_denselayer{i + 1}")(x, train)
            if b != len(self.block_config) - 1:
                x = nn.relu(batch_norm(train, name=f"transition{b + 1}_norm", dtype=self.dtype)(x))
                x = conv(x.shape[-1] // 2, 1, name=f"transition{b + 1}_conv", dtype=self.dtype)(x)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(batch_norm(train, name="norm5", dtype=self.dtype)(x))
        feats = jnp.mean(x, axis=(1, 2))
        logits = dense(self.num_classes, name="classifier", dtype=self.dtype)(feats)
        return outputs(logits.astype(jnp.float32), feats.astype(jnp.float32), features)


def densenet121(**kw):
    return DenseNet(block_config=(6, 12, 24, 16), growth=32, init_features=64, **kw)
