"""A biased continual sequence in the spirit of Colored MNIST / Corrupted CIFAR-10 (Nam et al.,
"Learning from Failure", 2020): `config.data.name = 'synthetic_bias'`.

Task t has its own two classes (global classes 2t, 2t + 1) and its own look:
  * true cue: the outline of a filled glyph (task 0 plus / cross, 1 square / diamond, 2 triangle
    up / down, 3 disk / ring, 4 horizontal / vertical bar), randomly placed, scaled and turned by
    up to +-15 degrees, under per-pixel Gaussian noise (`noise`): learnable, but a network needs
    many examples to read it;
  * spurious cue: the glyph's colour, one of the task's two colours (task 0 red / green, 1 blue /
    yellow, ...). In training (and validation) the colour index (attribute `bias`) equals the
    within-task label with probability `bias_rate`, otherwise it is the other colour; in the
    test set with probability `test_bias_rate` (0.5: unbiased). A colour is read from any
    pixel of the glyph, so it survives the noise: the shortcut is easier than the outline.
    `shared_colours`: every task uses task 0's red / green instead, so the sensitive attribute
    is one attribute across the sequence, as skin type is in every task of Fitzpatrick17k:
    a later task then trains the colour features further instead of overwriting them;
  * background: a task-specific tone and texture (stripes, checker, gradient, dots, plain), so
    that a task's images are told apart from another task's at a glance.
`shape_noise` (label noise on the true cue): that fraction of training images carries the
other class's glyph (the colour still follows the bias rule).
`patch_size` > 0 (default 0: the glyph carries the colour, and the images are bitwise those
without the option) moves the spurious cue into a small square: the glyph is drawn in one
neutral grey whatever its attribute, and a patch_size x patch_size square, `PATCH_MARGIN`
pixels from the top-left corner (so that 2-pixel shifts keep it whole; flips move it to
another corner), takes the attribute's colour. The shortcut then lives where few units can
see it: a small area, read by the units whose receptive field covers a corner, while the
outline fills the middle of the image (issue 23: a sequence where a faithful bias score must
beat magnitude if the paper's mechanism holds).

Records: image uint8 [S, S, 3], global label, attrs {'bias': colour index 0/1 (the sensitive
attribute), 'aligned': 1 if the colour matches the label else 0 (bias-conflicting)}, index.
Everything is a function of (seed, split): the same config gives the same images.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxmed.data import Dataset, register
from jaxmed.data.sources import ArraySource, DatasetInfo

MAX_TASKS = 5
SHAPES = (("plus", "cross"), ("square", "diamond"), ("tri_up", "tri_down"), ("disk", "ring"),
          ("hbar", "vbar"))
COLOURS = np.array([  # per task: the two glyph colours (RGB)
    [[220, 40, 40], [40, 200, 60]], [[50, 80, 230], [230, 210, 40]],
    [[220, 50, 220], [40, 210, 220]], [[240, 140, 20], [130, 50, 200]],
    [[245, 245, 245], [120, 120, 120]]], np.float32)
GLYPH_NEUTRAL = np.array([190, 190, 190], np.float32)  # the glyph's colour under `patch_size`
PATCH_MARGIN = 2
BACKGROUNDS = np.array([[70, 110, 150], [150, 120, 70], [90, 140, 90], [140, 90, 130],
                        [110, 110, 110]], np.float32)  # equal brightness: tasks differ in hue


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_tasks=2, num_train=3000, num_val=100, num_test=600,  # images per task
        bias_rate=0.97, test_bias_rate=0.5, shape_noise=0.0, noise=40.0, task_background=True,
        shared_colours=False, patch_size=0, seed=0))


def _glyph(kind: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Masks [N, S, S] of glyph `kind` [N] (index into the flattened SHAPES) at coordinates
    u, v (centred, rotated) with radius r [N, 1, 1]."""
    au, av = np.abs(u), np.abs(v)
    d = np.hypot(u, v)
    w = 0.35 * r  # stroke half-width
    tri = (v < 0.5 * r) & (v > -r + 2 * au)  # apex up (v grows downwards)
    masks = {
        "plus": ((au < w) & (av < r)) | ((av < w) & (au < r)),
        "cross": (np.abs(u - v) < 1.41 * w) & (d < r) | (np.abs(u + v) < 1.41 * w) & (d < r),
        "disk": d < 0.85 * r,
        "ring": (d < r) & (d > 0.4 * r),
        "tri_up": tri,
        "tri_down": (-v < 0.5 * r) & (-v > -r + 2 * au),
        "square": (au < 0.75 * r) & (av < 0.75 * r),
        "diamond": au + av < r,
        "hbar": (au < r) & (av < 0.45 * r),
        "vbar": (av < r) & (au < 0.45 * r),
    }
    names = [n for pair in SHAPES for n in pair]
    out = np.zeros(u.shape, bool)
    for i, n in enumerate(names):
        out |= (kind == i)[:, None, None] & masks[n]
    return out


def _background(task: np.ndarray, xx, yy, rng) -> np.ndarray:
    """Task-specific tone and texture [N, S, S, 3] (task -1: the shared plain grey)."""
    n = len(task)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    t = task[:, None, None]
    stripes = np.sin(2 * np.pi * 4 * yy[None] + phase)
    checker = np.sign(np.sin(2 * np.pi * 3 * xx[None] + phase) * np.sin(2 * np.pi * 3 * yy[None]))
    gradient = 2 * xx[None] - 1 + 0 * phase
    dots = (np.sin(2 * np.pi * 5 * xx[None] + phase) * np.sin(2 * np.pi * 5 * yy[None]) > 0.6
            ) * 2.0 - 1
    texture = np.select([t == 0, t == 1, t == 2, t == 3], [stripes, checker, gradient, dots],
                        0.0 * stripes)
    tone = np.where((task < 0)[:, None], 110.0, BACKGROUNDS[task]) + rng.normal(0, 8, (n, 3))
    return tone[:, None, None, :] + 25.0 * texture[..., None]


def generate(num_tasks: int, per_task: int, size: int, bias_rate: float, *, shape_noise: float
             = 0.0, noise: float = 40.0, task_background: bool = True,
             shared_colours: bool = False, patch_size: int = 0, seed: int = 0):
    """(images uint8 [N, S, S, 3], labels [N], bias [N], aligned [N]), tasks in order."""
    if not 1 <= num_tasks <= MAX_TASKS:
        raise ValueError(f"synthetic_bias: num_tasks={num_tasks} must be in 1..{MAX_TASKS}")
    if not 0 <= bias_rate <= 1 or not 0 <= shape_noise < 0.5:
        raise ValueError(f"synthetic_bias: bias_rate={bias_rate} must be in [0, 1] and "
                         f"shape_noise={shape_noise} in [0, 0.5)")
    if patch_size != int(patch_size) or not 0 <= patch_size <= size // 2 - PATCH_MARGIN:
        raise ValueError(f"synthetic_bias: patch_size={patch_size} must be an integer in "
                         f"0..{size // 2 - PATCH_MARGIN} for {size}-pixel images")
    rng = np.random.default_rng(seed)
    n = num_tasks * per_task
    task = np.repeat(np.arange(num_tasks), per_task)
    y = rng.integers(0, 2, n)
    aligned = rng.random(n) < bias_rate
    bias = np.where(aligned, y, 1 - y)
    drawn = np.where(rng.random(n) < shape_noise, 1 - y, y)  # the glyph actually drawn
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = (0.5 + rng.uniform(-0.15, 0.15, (2, n, 1, 1))).astype(np.float32)
    r = rng.uniform(0.22, 0.32, (n, 1, 1)).astype(np.float32)
    a = rng.uniform(-np.pi / 12, np.pi / 12, (n, 1, 1)).astype(np.float32)
    du, dv = xx[None] - cx, yy[None] - cy
    u, v = np.cos(a) * du + np.sin(a) * dv, -np.sin(a) * du + np.cos(a) * dv
    mask = _glyph(2 * task + drawn, u, v, r)
    jitter = rng.normal(0, 12, (n, 3))
    colour = COLOURS[0 if shared_colours else task, bias] + jitter
    img = _background(task if task_background else np.full(n, -1), xx, yy, rng)
    glyph = GLYPH_NEUTRAL + jitter if patch_size else colour
    img = np.where(mask[..., None], glyph[:, None, None, :], img)
    if patch_size:
        corner = slice(PATCH_MARGIN, PATCH_MARGIN + int(patch_size))
        img[:, corner, corner] = colour[:, None, None, :]
    img += rng.normal(0, noise, img.shape)
    images = np.clip(img, 0, 255).astype(np.uint8)
    return images, 2 * task + y, bias.astype(np.int32), aligned.astype(np.int32)


def _source(s, per_task: int, size: int, bias_rate: float, split_seed: int, shape_noise: float):
    images, labels, bias, aligned = generate(int(s.num_tasks), int(per_task), size,
                                             float(bias_rate), shape_noise=shape_noise,
                                             noise=float(s.noise),
                                             task_background=bool(s.task_background),
                                             shared_colours=bool(s.shared_colours),
                                             patch_size=int(s.get("patch_size", 0)),
                                             seed=[int(s.seed), split_seed])
    return ArraySource(images, labels.astype(np.int64), {"bias": bias, "aligned": aligned})


@register("synthetic_bias")
def build(cfg) -> Dataset:
    if "synthetic_bias" not in cfg:
        raise ValueError("config.data.synthetic_bias is missing: start from "
                         "jaxmed.data.synthetic_bias.default_config()")
    s = cfg.synthetic_bias
    size = int(cfg.image_size)
    if int(s.num_tasks) > 2 and "vflip" in str(cfg.get("train_augment", "")):
        raise ValueError(f"config.data.train_augment={cfg.train_augment!r} flips vertically, "
                         "which swaps task 2's glyphs (tri_up / tri_down): drop 'vflip' or "
                         f"keep config.data.synthetic_bias.num_tasks <= 2 (got {s.num_tasks})")
    splits = {
        "train": _source(s, s.num_train, size, s.bias_rate, 1, float(s.shape_noise)),
        "val": _source(s, s.num_val, size, s.bias_rate, 2, 0.0),
        "test": _source(s, s.num_test, size, s.test_bias_rate, 3, 0.0),
    }
    names = [f"t{t}_{shape}" for t in range(int(s.num_tasks)) for shape in SHAPES[t]]
    counts = np.bincount(splits["train"].labels, minlength=len(names))
    info = DatasetInfo("synthetic_bias", names, False, 3, None, ["bias", "aligned"], counts)
    return Dataset(splits, info)


__all__ = ["build", "default_config", "generate"]
