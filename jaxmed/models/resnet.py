"""ResNets in flax.linen: ImageNet ResNet-18/34/50 (optionally with a small-image stem) and the
CIFAR-style ResNet-56 used by BiasPruner's reference.

Module names mirror torchvision (`conv1`, `bn1`, `layer1_0`, `fc`) so that PyTorch checkpoints
convert by name (`convert.py`) and pruning units read like the papers' code. Every block takes
its own inner width(s), so a channel-pruned network compacts into a smaller instance of the same
class (`jaxmed.pruning.structured`).

Outputs: `logits`, or `(logits, features)` with `features=True` (the penultimate, pooled
features): nothing else changes the returned structure. The post-ReLU activations of every
prunable conv (the inner convs of each block: they can lose channels without breaking a residual
sum) are sown into the `intermediates` collection; read them with
`model.apply(..., mutable=["intermediates"])` and `common.sown(...)`, keyed `layer1_0/conv1`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.models.common import batch_norm, conv, dense, outputs, sow_activation


class BasicBlock(nn.Module):
    """3x3 -> 3x3 block; `inner` is the width of conv1 (the prunable unit)."""

    inner: Sequence[int]
    out: int
    stride: int = 1
    shortcut: str = "conv"  # 'conv' (1x1 projection, torchvision) or 'pad' (CIFAR option A)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        (inner,) = self.inner
        y = conv(inner, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
        sow_activation(self, "conv1", y)
        y = conv(self.out, 3, name="conv2", dtype=self.dtype)(y)
        y = batch_norm(train, name="bn2", dtype=self.dtype)(y)
        return nn.relu(y + self._shortcut(x, train))

    def _shortcut(self, x, train):
        if self.stride == 1 and x.shape[-1] == self.out:
            return x
        if self.shortcut == "pad":
            x = x[:, :: self.stride, :: self.stride, :]
            extra = self.out - x.shape[-1]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        x = conv(self.out, 1, self.stride, name="downsample_0", dtype=self.dtype)(x)
        return batch_norm(train, name="downsample_1", dtype=self.dtype)(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision v1.5) -> 1x1 block; conv1 and conv2 are units."""

    inner: Sequence[int]
    out: int
    stride: int = 1
    shortcut: str = "conv"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        w1, w2 = self.inner
        y = conv(w1, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(y))
        sow_activation(self, "conv1", y)
        y = conv(w2, 3, self.stride, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(batch_norm(train, name="bn2", dtype=self.dtype)(y))
        sow_activation(self, "conv2", y)
        y = conv(self.out, 1, name="conv3", dtype=self.dtype)(y)
        y = batch_norm(train, name="bn3", dtype=self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != self.out:
            x = conv(self.out, 1, self.stride, name="downsample_0", dtype=self.dtype)(x)
            x = batch_norm(train, name="downsample_1", dtype=self.dtype)(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """A ResNet given stage sizes and (optionally) every block's inner widths.

    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool), 'small' (3x3/1 conv, no pool; for 28-64 px)
    or 'cifar' (3x3/1 conv with `stem_width` channels, as ResNet-56).
    """

    stage_sizes: Sequence[int]
    block: str = "basic"  # 'basic' or 'bottleneck'
    num_classes: int = 1000
    width: int = 64  # channels of the first stage; stages double it
    stem: str = "imagenet"
    shortcut: str = "conv"
    inner_widths: Sequence[Sequence[int]] | None = None  # per block, in order
    dtype: Any = jnp.float32

    def default_inner_widths(self) -> list[tuple[int, ...]]:
        widths = []
        for s, n in enumerate(self.stage_sizes):
            w = self.width * 2**s
            widths += [(w,) if self.block == "basic" else (w, w)] * n
        return widths

    def trunk(self, x, train: bool) -> list:
        """[stem output (after its ReLU, before the ImageNet stem's max-pool), stage 1 output,
        ..., last stage output]; called inside a compact method (the head, a U-Net encoder)."""
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.width, 7, 2, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(x))
            outs = [x]
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(self.width, 3, 1, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(x))
            outs = [x]
        inner = list(self.inner_widths or self.default_inner_widths())
        if len(inner) != sum(self.stage_sizes):
            raise ValueError(f"inner_widths has {len(inner)} blocks, the ResNet has "
                             f"{sum(self.stage_sizes)}")
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        expansion = 1 if self.block == "basic" else 4
        b = 0
        for s, n in enumerate(self.stage_sizes):
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                x = block_cls(tuple(inner[b]), self.width * 2**s * expansion, stride,
                              self.shortcut, self.dtype, name=f"layer{s + 1}_{i}")(x, train)
                b += 1
            outs.append(x)
        return outs

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        x = self.trunk(x, train)[-1]
        feats = jnp.mean(x, axis=(1, 2))
        logits = dense(self.num_classes, name="fc", dtype=self.dtype)(feats).astype(jnp.float32)
        return outputs(logits, feats.astype(jnp.float32), features)


def resnet18(**kw):
    return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", **kw)


def resnet34(**kw):
    return ResNet(stage_sizes=(3, 4, 6, 3), block="basic", **kw)


def resnet50(**kw):
    return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", **kw)


def cifar_resnet(depth: int, **kw):
    """CIFAR ResNet-(6n+2): 3 stages x n basic blocks, 16-32-64 channels, option-A shortcuts
    (He et al. 2016); depth 56 is BiasPruner's reference model, 8 and 20 are small ones."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    kw.setdefault("width", 16)
    kw.setdefault("shortcut", "pad")
    return ResNet(stage_sizes=(n, n, n), block="basic", stem="cifar", **kw)


def resnet8(**kw):
    return cifar_resnet(8, **kw)


def resnet20(**kw):
    return cifar_resnet(20, **kw)


def resnet56(**kw):
    return cifar_resnet(56, **kw)
