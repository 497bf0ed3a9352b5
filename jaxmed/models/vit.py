"""Vision Transformer (ViT-S / ViT-B, pre-norm, CLS token) in flax.linen, the shape of the
DINOv2 / timm teachers. `features=True` returns the normed CLS token; `capture=True` returns each
block's post-GELU MLP hidden units (`blocks_3/mlp`), the prunable width of a transformer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.models.common import dense, pack_outputs


class Block(nn.Module):
    dim: int
    heads: int
    mlp_ratio: float
    dtype: Any

    @nn.compact
    def __call__(self, x, acts: dict | None):
        ln = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
        y = ln("norm1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype,
                                            param_dtype=jnp.float32, name="attn")(y, y)
        x = x + y
        y = ln("norm2")(x)
        y = nn.gelu(dense(int(self.dim * self.mlp_ratio), name="fc1", dtype=self.dtype)(y),
                    approximate=False)
        if acts is not None:
            acts["mlp"] = y
        return x + dense(self.dim, name="fc2", dtype=self.dtype)(y)


class ViT(nn.Module):
    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, capture: bool = False):
        del train  # no dropout / BN: train and eval forward passes are the same
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch),
                    padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                    name="patch_embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, d),
                         jnp.float32)
        x = x + pos.astype(x.dtype)
        acts = {} if capture else None
        for i in range(self.depth):
            block_acts = {} if capture else None
            x = Block(self.dim, self.heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(
                x, block_acts)
            if capture:
                acts.update({f"blocks_{i}/{k}": v for k, v in block_acts.items()})
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        feats = x[:, 0]
        logits = dense(self.num_classes, name="head", dtype=self.dtype)(feats)
        return pack_outputs(logits.astype(jnp.float32), feats.astype(jnp.float32), acts,
                            features, capture)


def vit_s(**kw):
    return ViT(dim=384, depth=12, heads=6, **kw)


def vit_b(**kw):
    return ViT(dim=768, depth=12, heads=12, **kw)
