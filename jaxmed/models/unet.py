"""U-Net with a ResNet encoder, for binary lesion segmentation (Attend Who is Weak, ISIC 2018).

The encoder is the ResNet's own trunk (stem + stages, no head) under the submodule `encoder`,
with the ResNet's submodule names (`conv1`, `bn1`, `layer1_0`, ...): its variables are the
ResNet's minus `fc`, so `load_encoder` fills it from a torchvision checkpoint through
`convert.py`, and pruning reads the same names. The stage outputs come from the trunk itself
(`ResNetEncoder.__call__` returns them), so nothing depends on how ResNet exposes intermediates.

Decoder (as segmentation_models_pytorch's Unet): from the deepest stage up, each level upsamples
(nearest) to the next shallower encoder output, concatenates it, and applies conv-BN-ReLU twice;
skips are the stem output and every stage but the last. If the shallowest skip is below the
input resolution (ImageNet stem: 1/2), a last level upsamples to the input without a skip.
A 1x1 conv gives `num_classes` (1: binary lesion) logits per pixel, float32, at the input size:
`(B, H, W, num_classes)`. Decoder widths default to 4w, 2w, w, w/2, w/4 (w = encoder width;
256..16 for w = 64, smp's defaults), at least 4. Compute runs in `dtype`, params stay float32.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models import convert
from jaxmed.models.common import batch_norm, conv
from jaxmed.models.resnet import ResNet, resnet18, resnet34, resnet50


class ResNetEncoder(ResNet):
    """`ResNet` without its head, returning [stem output, stage 1 output, ..., last stage].

    The stem output is taken after its ReLU (before the ImageNet stem's max-pool). It runs the
    ResNet's own `trunk`, so the variable names are the ResNet's; `num_classes` is unused."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.trunk(x, train)


def upsample_to(x, hw: Sequence[int]):
    """Nearest upsampling of NHWC `x` to spatial size hw (repeat for integer factors)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(hw):
        return x
    if hw[0] % h == 0 and hw[1] % w == 0:
        return jnp.repeat(jnp.repeat(x, hw[0] // h, axis=1), hw[1] // w, axis=2)
    return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[3]), "nearest")


class DecoderBlock(nn.Module):
    """conv3x3-BN-ReLU, twice."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for k in (1, 2):
            x = conv(self.features, 3, name=f"conv{k}", dtype=self.dtype)(x)
            x = nn.relu(batch_norm(train, name=f"bn{k}", dtype=self.dtype)(x))
        return x


class UNet(nn.Module):
    """U-Net on a ResNet trunk; the trunk fields are `ResNet`'s (see `unet_from`)."""

    stage_sizes: Sequence[int]
    block: str = "basic"
    width: int = 64
    stem: str = "imagenet"
    shortcut: str = "conv"
    inner_widths: Sequence[Sequence[int]] | None = None
    num_classes: int = 1
    decoder_widths: Sequence[int] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        size = tuple(x.shape[1:3])
        skips = ResNetEncoder(stage_sizes=self.stage_sizes, block=self.block, width=self.width,
                              stem=self.stem, shortcut=self.shortcut,
                              inner_widths=self.inner_widths, dtype=self.dtype,
                              name="encoder")(x, train)
        bottom = y = skips[-1]
        levels = list(reversed(skips[:-1]))
        if tuple(skips[0].shape[1:3]) != size:
            levels.append(None)  # the last level reaches the input size without a skip
        widths = list(self.decoder_widths or
                      [max(self.width * 4 // 2**i, 4) for i in range(len(levels))])
        if len(widths) != len(levels):
            raise ValueError(f"decoder_widths has {len(widths)} entries, this U-Net has "
                             f"{len(levels)} decoder levels")
        for i, skip in enumerate(levels):
            y = upsample_to(y, size if skip is None else skip.shape[1:3])
            if skip is not None:
                y = jnp.concatenate([y, skip], axis=-1)
            y = DecoderBlock(widths[i], self.dtype, name=f"decoder{i}")(y, train)
        logits = conv(self.num_classes, 1, name="head", dtype=self.dtype, use_bias=True)(y)
        logits = logits.astype(jnp.float32)
        if features:
            return logits, jnp.mean(bottom, axis=(1, 2)).astype(jnp.float32)
        return logits


def unet_from(resnet: ResNet, num_classes: int = 1,
              decoder_widths: Sequence[int] | None = None) -> UNet:
    """A U-Net whose encoder is `resnet`'s trunk (its head is dropped)."""
    return UNet(stage_sizes=tuple(resnet.stage_sizes), block=resnet.block, width=resnet.width,
                stem=resnet.stem, shortcut=resnet.shortcut, inner_widths=resnet.inner_widths,
                num_classes=num_classes, decoder_widths=decoder_widths, dtype=resnet.dtype)


def _factory(resnet_fn):
    def make(num_classes: int = 1, decoder_widths: Sequence[int] | None = None, **resnet_kw):
        return unet_from(resnet_fn(**resnet_kw), num_classes, decoder_widths)
    make.__doc__ = f"U-Net on {resnet_fn.__name__}; kwargs other than the decoder's go to it."
    return make


unet_resnet18 = _factory(resnet18)
unet_resnet34 = _factory(resnet34)
unet_resnet50 = _factory(resnet50)


def load_encoder(variables: Mapping[str, Any], state_dict: Mapping[str, Any],
                 arch: str) -> dict:
    """`variables` with the encoder's params and batch_stats converted from a torchvision-layout
    ResNet state_dict (`arch` 'resnet18' / 'resnet34' / 'resnet50'; its `fc` is ignored)."""
    target = {col: variables[col]["encoder"] for col in ("params", "batch_stats")}
    loaded = convert.convert_state_dict(state_dict, arch, target=target)
    return {**variables, **{col: {**variables[col], "encoder": loaded[col]}
                            for col in ("params", "batch_stats")}}


def encoder_of(resnet: ResNet) -> ResNetEncoder:
    """The trunk of a ResNet classifier as a module returning its stage outputs; it takes the
    classifier's variables minus `fc` (class activation maps read its last stage)."""
    if not isinstance(resnet, ResNet):
        raise ValueError(f"a ResNet is needed for its trunk, got {type(resnet).__name__}")
    return ResNetEncoder(stage_sizes=resnet.stage_sizes, block=resnet.block, width=resnet.width,
                         stem=resnet.stem, shortcut=resnet.shortcut,
                         inner_widths=resnet.inner_widths, dtype=resnet.dtype)
