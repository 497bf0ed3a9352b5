"""Model zoo: `create_model(name, num_classes, ...)` and the names it knows."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxmed.models.alexnet import AlexNet, alexnet
from jaxmed.models.densenet import DenseNet, densenet121
from jaxmed.models.resnet import (ResNet, resnet8, resnet18, resnet20, resnet34, resnet50,
                                   resnet56)
from jaxmed.models.unet import UNet, unet_resnet18, unet_resnet34, unet_resnet50
from jaxmed.models.vit import ViT, dinov2_vitb14, dinov2_vits14, vit_b, vit_s

MODELS = {
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
    "resnet8": resnet8, "resnet20": resnet20, "resnet56": resnet56,
    "densenet121": densenet121, "alexnet": alexnet, "vit_s": vit_s, "vit_b": vit_b,
    "dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14,
    "unet_resnet18": unet_resnet18, "unet_resnet34": unet_resnet34,
    "unet_resnet50": unet_resnet50,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create_model(name: str, num_classes: int, *, dtype: str | Any = "float32", **kw):
    """Build a model by name. ResNet kwargs: `width`, `stem` ('imagenet' | 'small' | 'cifar'),
    `inner_widths`; ViT: `patch`, `depth`, `pos_grid`. `dtype` is the compute dtype; params
    stay float32."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown model dtype {dtype!r}; known: {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return MODELS[name](num_classes=num_classes, dtype=dtype, **kw)


__all__ = ["AlexNet", "DenseNet", "MODELS", "ResNet", "UNet", "ViT", "alexnet", "create_model",
           "densenet121", "dinov2_vitb14", "dinov2_vits14", "resnet8", "resnet18", "resnet20",
           "resnet34", "resnet50", "resnet56", "unet_resnet18", "unet_resnet34",
           "unet_resnet50", "vit_b", "vit_s"]
