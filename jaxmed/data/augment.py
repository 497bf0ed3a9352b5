"""Augmentation on the host (numpy / PIL, in grain workers) and on the device (jnp, batched).

Host chains are written as strings, big_vision style: ``"rrc(0.08)|flip|rotate(15)"``. Ops:
  flip, vflip                 horizontal / vertical flip with probability 0.5
  rotate(deg)                 uniform rotation in [-deg, deg]
  translate(pad)              reflect-pad by `pad` then crop back (FixMatch's weak view)
  rrc(min_scale)              random resized crop, aspect 3/4..4/3 (torchvision)
  randaugment(n, m)           n random ops of the 14 below at a random magnitude <= m (of 10)
  cutout(size)                one size x size grey square at a random place
Every op takes and returns a uint8 HxWxC array and draws from the numpy Generator it is given,
so a sample's augmentation depends only on (seed, its position in the stream).

Normalisation (ImageNet mean/std) runs on the device inside the jitted step (`normalize`), so
batches travel host -> device as uint8.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


def _np(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img, np.uint8)
    return a[..., None] if a.ndim == 2 else a[..., :channels]


def _fill(x):
    return (128,) * x.shape[-1] if x.shape[-1] > 1 else 128


def flip(x, rng):
    return x[:, ::-1] if rng.random() < 0.5 else x


def vflip(x, rng):
    return x[::-1] if rng.random() < 0.5 else x


def rotate(x, rng, degrees: float = 15.0):
    angle = rng.uniform(-degrees, degrees)
    return _np(_pil(x).rotate(angle, resample=Image.BILINEAR), x.shape[-1])


def translate(x, rng, pad: int = 4):
    h, w = x.shape[:2]
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    i, j = rng.integers(0, 2 * pad + 1, size=2)
    return np.ascontiguousarray(padded[i:i + h, j:j + w])


def random_resized_crop(x, rng, min_scale: float = 0.08, ratio=(3 / 4, 4 / 3), out_hw=None):
    """torchvision's RandomResizedCrop: 10 tries at a random area/aspect, else centre crop;
    the crop is resized to `out_hw` (default: the input's size)."""
    h, w = x.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            i, j = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        i, j = (h - ch) // 2, (w - cw) // 2
    oh, ow = out_hw or (h, w)
    crop = _pil(x).resize((ow, oh), Image.BILINEAR, box=(j, i, j + cw, i + ch))
    return _np(crop, x.shape[-1])


def cutout(x, rng, size: int = 16):
    h, w = x.shape[:2]
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    y0, y1 = max(cy - size // 2, 0), min(cy + size // 2, h)
    x0, x1 = max(cx - size // 2, 0), min(cx + size // 2, w)
    x = x.copy()
    x[y0:y1, x0:x1] = 128
    return x


# RandAugment's 14 ops (FixMatch's list); v in [0, 1] is the magnitude fraction.
def _affine(img, coeffs, fill):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=fill)


def _randaug_ops():
    sign = lambda r: 1 if r.random() < 0.5 else -1  # noqa: E731
    return [
        ("identity", lambda im, v, r, f: im),
        ("autocontrast", lambda im, v, r, f: ImageOps.autocontrast(im)),
        ("equalize", lambda im, v, r, f: ImageOps.equalize(im)),
        ("rotate", lambda im, v, r, f: im.rotate(sign(r) * 30 * v, resample=Image.BILINEAR,
                                                fillcolor=f)),
        ("solarize", lambda im, v, r, f: ImageOps.solarize(im, int(256 - 256 * v))),
        ("color", lambda im, v, r, f: ImageEnhance.Color(im).enhance(1 + sign(r) * 0.9 * v)),
        ("posterize", lambda im, v, r, f: ImageOps.posterize(im, max(1, 8 - int(4 * v)))),
        ("contrast", lambda im, v, r, f: ImageEnhance.Contrast(im).enhance(1 + sign(r) * 0.9 * v)),
        ("brightness", lambda im, v, r, f: ImageEnhance.Brightness(im).enhance(
            1 + sign(r) * 0.9 * v)),
        ("sharpness", lambda im, v, r, f: ImageEnhance.Sharpness(im).enhance(
            1 + sign(r) * 0.9 * v)),
        ("shear_x", lambda im, v, r, f: _affine(im, (1, sign(r) * 0.3 * v, 0, 0, 1, 0), f)),
        ("shear_y", lambda im, v, r, f: _affine(im, (1, 0, 0, sign(r) * 0.3 * v, 1, 0), f)),
        ("translate_x", lambda im, v, r, f: _affine(
            im, (1, 0, sign(r) * 0.3 * v * im.size[0], 0, 1, 0), f)),
        ("translate_y", lambda im, v, r, f: _affine(
            im, (1, 0, 0, 0, 1, sign(r) * 0.3 * v * im.size[1]), f)),
    ]


RANDAUGMENT_OPS = _randaug_ops()


def randaugment(x, rng, n: int = 2, magnitude: float = 10.0):
    """n ops drawn uniformly from 14, each at a magnitude drawn in [0, magnitude] / 10."""
    img = _pil(x)
    fill = _fill(x)
    for k in rng.choice(len(RANDAUGMENT_OPS), size=int(n), replace=True):
        v = rng.uniform(0, magnitude) / 10.0
        img = RANDAUGMENT_OPS[k][1](img, v, rng, fill)
    return _np(img, x.shape[-1])


# op(x: uint8 HxWxC, rng: np.random.Generator, *args) -> uint8 HxWxC
HOST_OPS: dict[str, Callable] = {
    "flip": flip, "vflip": vflip, "rotate": rotate, "translate": translate,
    "rrc": random_resized_crop, "randaugment": randaugment, "cutout": cutout,
}


GEOMETRIC = ("flip", "vflip", "rotate", "translate", "rrc")  # safe to apply to masks too


Step = tuple[str, tuple]  # (op name, its arguments): picklable, for grain worker processes


def parse_steps(spec: str) -> tuple[Step, ...]:
    """'rrc(0.08)|rotate(15)|flip' -> (('rrc', (0.08,)), ('rotate', (15,)), ('flip', ()));
    unknown names fail naming the op."""
    out = []
    for part in filter(None, (p.strip() for p in (spec or "").split("|"))):
        m = re.fullmatch(r"(\w+)(?:\((.*)\))?", part)
        if not m or m.group(1) not in HOST_OPS:
            raise ValueError(f"unknown augmentation {part!r} in {spec!r}; known: "
                             f"{sorted(HOST_OPS)}")
        args = tuple(float(a) if "." in a else int(a) for a in m.group(2).split(",")) \
            if m.group(2) else ()
        out.append((m.group(1), args))
    return tuple(out)


def apply_steps(steps: tuple[Step, ...], x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for name, args in steps:
        x = HOST_OPS[name](x, rng, *args)
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------- on device
def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=jnp.float32):
    """uint8 (..., C) -> float, ImageNet statistics; 1-channel images use the mean of each."""
    c = images.shape[-1]
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    if c != mean.shape[0]:
        mean, std = jnp.full((c,), mean.mean()), jnp.full((c,), std.mean())
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def device_flip(rng, images):
    """Per-sample random horizontal flip of a (B, H, W, C) batch."""
    do = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(do, images[:, :, ::-1], images)


def device_translate(rng, images, pad: int = 4):
    """Per-sample reflect-pad + random crop back to size, batched (vmap of dynamic_slice)."""
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offs = jax.random.randint(rng, (b, 2), 0, 2 * pad + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offs)


def device_color(rng, images, strength: float = 0.4):
    """Per-sample brightness / contrast / saturation jitter on float images in [0, 1]."""
    b = images.shape[0]
    kb, kc, ks = jax.random.split(rng, 3)
    u = lambda k: jax.random.uniform(k, (b, 1, 1, 1), minval=1 - strength,  # noqa: E731
                                     maxval=1 + strength)
    x = images * u(kb)
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * u(kc) + mean
    gray = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - gray) * u(ks) + gray
    return jnp.clip(x, 0.0, 1.0)
