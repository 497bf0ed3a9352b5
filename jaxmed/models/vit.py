"""Vision Transformer (ViT-S / ViT-B, pre-norm, CLS token) in flax.linen, in the DINOv2 layout
(`patch_embed/proj`, fused `attn/qkv`, `attn/proj`, `mlp/fc1`, `mlp/fc2`, layer scale
`ls1/gamma`, `ls2/gamma`), so official DINOv2 checkpoints convert by name (`convert.py`).

`features=True` returns the normed CLS token (DINOv2's `x_norm_clstoken`, FoPro-KD's teacher
target); each block's post-GELU MLP hidden units (`blocks_3/mlp`), the prunable width of a
transformer, are sown into `intermediates`.

Positional embeddings: with `pos_grid=None` the table has one entry per patch of the input (a
ViT trained at one size); with `pos_grid=M` it is an M x M table (DINOv2: 37 = 518 / 14)
resampled to the input's grid exactly as DINOv2's `interpolate_pos_encoding` does: torch bicubic
(a = -0.75, clamped borders, no antialias) with scale factor (grid + 0.1) / M.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models.common import dense, outputs, sow_activation


def _cubic_weights(t, a: float = -0.75):
    """torch's bicubic coefficients for the taps at offsets -1, 0, 1, 2 of fraction t."""
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """(out, in) matrix of torch's `interpolate(mode='bicubic', align_corners=False)` along one
    axis with an explicit scale factor: source = (i + 0.5) / scale - 0.5, taps clamped."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5
    base = np.floor(src)
    taps = np.clip(base[:, None].astype(int) + np.arange(-1, 3)[None], 0, in_size - 1)
    mat = np.zeros((out_size, in_size), np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_size), 4), taps.ravel()),
              _cubic_weights(src - base).ravel())
    return mat.astype(np.float32)


def interpolate_pos_embed(pos, grid_h: int, grid_w: int, image_h: int, image_w: int,
                          offset: float = 0.1):
    """DINOv2's `interpolate_pos_encoding`: (1, 1 + M*M, D) -> (1, 1 + grid_h*grid_w, D).

    Kept as is when the patch count matches and the image is square (DINOv2's early return);
    `offset` > 0 uses scale factors (grid + offset) / M, offset 0 the plain size ratio."""
    n = pos.shape[1] - 1
    m = int(round(n**0.5))
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if grid_h * grid_w == n and image_h == image_w:
        return pos
    sy = (grid_h + offset) / m if offset else grid_h / m
    sx = (grid_w + offset) / m if offset else grid_w / m
    wy, wx = bicubic_matrix(m, grid_h, sy), bicubic_matrix(m, grid_w, sx)
    patches = pos[0, 1:].astype(jnp.float32).reshape(m, m, -1)
    patches = jnp.einsum("ym,xn,mnd->yxd", wy, wx, patches,
                         precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:, :1], patches.reshape(1, grid_h * grid_w, -1)], axis=1)


class PatchEmbed(nn.Module):
    dim: int
    patch: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch),
                       padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                       name="proj")(x)


class Attention(nn.Module):
    dim: int
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        qkv = dense(3 * d, name="qkv", dtype=self.dtype)(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0] * hd**-0.5, qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return dense(d, name="proj", dtype=self.dtype)(y)


class LayerScale(nn.Module):
    init_value: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                           jnp.float32)
        return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(dense(self.hidden, name="fc1", dtype=self.dtype)(x), approximate=False)
        return dense(x.shape[-1], name="fc2", dtype=self.dtype)(y), y


class Block(nn.Module):
    dim: int
    heads: int
    mlp_ratio: float
    layer_scale: float | None
    dtype: Any

    @nn.compact
    def __call__(self, x):
        ln = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
        scale = ((lambda name: LayerScale(self.layer_scale, name=name))
                 if self.layer_scale is not None else (lambda name: lambda y: y))
        x = x + scale("ls1")(Attention(self.dim, self.heads, self.dtype, name="attn")(
            ln("norm1")(x)))
        y, hidden = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(ln("norm2")(x))
        sow_activation(self, "mlp", hidden)
        return x + scale("ls2")(y)


class ViT(nn.Module):
    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    layer_scale: float | None = None  # initial LayerScale gamma; None: no layer scale
    pos_grid: int | None = None  # side of the pos-embed table; None: the input's grid
    interpolate_offset: float = 0.1  # DINOv2's kludge in the scale factor (0: none)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        del train  # no dropout / BN: train and eval forward passes are the same
        _, height, width, _ = x.shape
        if height % self.patch or width % self.patch:
            raise ValueError(f"ViT input {height}x{width} is not a multiple of the patch size "
                             f"{self.patch}")
        x = jnp.asarray(x, self.dtype)
        x = PatchEmbed(self.dim, self.patch, self.dtype, name="patch_embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        grid = self.pos_grid or 0
        pos = self.param("pos_embed", nn.initializers.normal(0.02),
                         (1, (grid * grid if grid else h * w) + 1, d), jnp.float32)
        if grid:
            pos = interpolate_pos_embed(pos, h, w, height, width, self.interpolate_offset)
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp_ratio, self.layer_scale, self.dtype,
                      name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        feats = x[:, 0]
        logits = dense(self.num_classes, name="head", dtype=self.dtype)(feats)
        return outputs(logits.astype(jnp.float32), feats.astype(jnp.float32), features)


def vit_s(**kw):
    return ViT(dim=384, depth=12, heads=6, **kw)


def vit_b(**kw):
    return ViT(dim=768, depth=12, heads=12, **kw)


# DINOv2 backbones as torch.hub builds them: patch 14, 518 px pos-embed grid, LayerScale,
# no registers. Teachers: `features=True` gives the normed CLS token (384-d / 768-d).
DINOV2 = dict(patch=14, pos_grid=37, layer_scale=1.0, interpolate_offset=0.1)


def dinov2_vits14(**kw):
    return ViT(**{"dim": 384, "depth": 12, "heads": 6, **DINOV2, **kw})


def dinov2_vitb14(**kw):
    return ViT(**{"dim": 768, "depth": 12, "heads": 12, **DINOV2, **kw})
