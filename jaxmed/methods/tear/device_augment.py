"""FixMatch's strong view on the device: reflect-pad translate, flip, RandAugment (2 of the same
14 ops as jaxmed.data.augment, magnitude drawn in [0, m]) and cutout, batched in jnp.

Used when config.ssl.strong_on_device is True (the host then only resizes the strong view):
the PIL RandAugment in grain workers is the input pipeline's most expensive op, and on a
shared 2-core CPU the workers compete with the step (benchmarks/tear_step.py measures both).
Ops follow PIL's definitions on [0, 1] floats; 'equalize' maps each channel through its rank
(exact histogram equalisation up to ties). Per-sample randomness comes from the step's rng
(the state's), so a resumed run draws the same views.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from jaxmed.data.augment import device_flip, device_translate

FILL = 0.5


def _affine(img, m):
    """Sample img (H, W, C) at m @ (x - c, y - c, 1) + c (the inverse map), bilinear."""
    h, w, _ = img.shape
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    sx = m[0, 0] * (xx - cx) + m[0, 1] * (yy - cy) + m[0, 2] + cx
    sy = m[1, 0] * (xx - cx) + m[1, 1] * (yy - cy) + m[1, 2] + cy
    chans = [map_coordinates(img[..., k], [sy, sx], order=1, mode="constant", cval=FILL)
             for k in range(img.shape[-1])]
    return jnp.stack(chans, -1)


def _gray(img):
    return jnp.sum(img * jnp.asarray([0.299, 0.587, 0.114])[: img.shape[-1]], -1,
                   keepdims=True) if img.shape[-1] == 3 else img


def _blend(a, b, factor):
    return jnp.clip(b + factor * (a - b), 0.0, 1.0)


def _autocontrast(img, v, s):
    lo, hi = jnp.min(img, (0, 1), keepdims=True), jnp.max(img, (0, 1), keepdims=True)
    return jnp.where(hi > lo, (img - lo) / jnp.maximum(hi - lo, 1e-6), img)


def _equalize(img, v, s):
    h, w, c = img.shape
    flat = img.reshape(h * w, c)
    ranks = jnp.argsort(jnp.argsort(flat, axis=0), axis=0).astype(jnp.float32)
    return (ranks / max(h * w - 1, 1)).reshape(h, w, c)


def _rotate(img, v, s):
    t = jnp.deg2rad(s * 30.0 * v)
    m = jnp.array([[jnp.cos(t), -jnp.sin(t), 0.0], [jnp.sin(t), jnp.cos(t), 0.0]])
    return _affine(img, m)


def _solarize(img, v, s):
    return jnp.where(img >= 1.0 - v, 1.0 - img, img)


def _color(img, v, s):
    return _blend(img, _gray(img), 1.0 + s * 0.9 * v)


def _posterize(img, v, s):
    bits = jnp.maximum(1.0, 8.0 - jnp.floor(4.0 * v))
    q = 2.0 ** (8.0 - bits)
    return jnp.floor(jnp.round(img * 255.0) / q) * q / 255.0


def _contrast(img, v, s):
    return _blend(img, jnp.mean(_gray(img)), 1.0 + s * 0.9 * v)


def _brightness(img, v, s):
    return _blend(img, jnp.zeros_like(img), 1.0 + s * 0.9 * v)


def _sharpness(img, v, s):
    k = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w, _ = img.shape
    blur = sum(k[i, j] * pad[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return _blend(img, blur, 1.0 + s * 0.9 * v)


def _shear_x(img, v, s):
    return _affine(img, jnp.array([[1.0, s * 0.3 * v, 0.0], [0.0, 1.0, 0.0]]))


def _shear_y(img, v, s):
    return _affine(img, jnp.array([[1.0, 0.0, 0.0], [s * 0.3 * v, 1.0, 0.0]]))


def _translate_x(img, v, s):
    return _affine(img, jnp.array([[1.0, 0.0, -s * 0.3 * v * img.shape[1]], [0.0, 1.0, 0.0]]))


def _translate_y(img, v, s):
    return _affine(img, jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, -s * 0.3 * v * img.shape[0]]]))


OPS = (lambda img, v, s: img, _autocontrast, _equalize, _rotate, _solarize, _color, _posterize,
       _contrast, _brightness, _sharpness, _shear_x, _shear_y, _translate_x, _translate_y)


def _randaugment_one(img, key, n: int, magnitude: float):
    for _ in range(n):  # n (2) ops per image: a static unroll, not a loop over samples
        key, k_op, k_v, k_s = jax.random.split(key, 4)
        op = jax.random.randint(k_op, (), 0, len(OPS))
        v = jax.random.uniform(k_v) * magnitude / 10.0
        s = jnp.where(jax.random.bernoulli(k_s), 1.0, -1.0)
        img = jax.lax.switch(op, OPS, img, v, s)
    return img


def device_cutout(rng, images, size: int):
    """One size x size grey square per image at a random centre (float images)."""
    b, h, w, _ = images.shape
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (b, 1, 1, 1), 0, h)
    cx = jax.random.randint(kx, (b, 1, 1, 1), 0, w)
    yy = jnp.arange(h)[None, :, None, None]
    xx = jnp.arange(w)[None, None, :, None]
    inside = ((yy >= cy - size // 2) & (yy < cy + size // 2)
              & (xx >= cx - size // 2) & (xx < cx + size // 2))
    return jnp.where(inside, FILL, images)


def strong_augment(rng, images, *, n: int = 2, magnitude: float = 10.0, cutout: int = 16,
                   pad: int = 4):
    """uint8 (B, H, W, C) -> uint8: translate, flip, RandAugment(n, magnitude), cutout."""
    k_t, k_f, k_r, k_c = jax.random.split(rng, 4)
    x = device_flip(k_f, device_translate(k_t, images, pad)).astype(jnp.float32) / 255.0
    keys = jax.random.split(k_r, x.shape[0])
    x = jax.vmap(lambda im, k: _randaugment_one(im, k, n, magnitude))(x, keys)
    if cutout > 0:
        x = device_cutout(k_c, x, cutout)
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
