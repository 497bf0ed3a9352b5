"""Procedural lesion-like images: a built-in dataset with every knob the methods need.

Each image is a skin-like background (tone, smooth texture, noise) with a lesion whose outline
(number of lobes) and colour carry the class. Knobs:
  num_classes, num_samples, image_size
  imbalance     n_min / n_max of the class counts, geometric in between (1.0 = balanced;
                0.01 = a long tail); in multi-label mode it shapes the per-class prevalences
  bias_rate     if set, a spurious attribute `bias` (the background tone, like skin type) equals
                `label % num_attr_values` with this probability, and is random otherwise
                (0.95 = strongly biased training set, 0.5 with 2 values = unbiased)
  class_cue     'color_shape' (colour and outline differ: easy) or 'shape' (one lesion colour,
                classes differ only by outline: the spurious tone is easier to learn)
  multi_label   C findings drawn independently, each a coloured glyph at its own place
  hard_rate     fraction of a rare hard sub-population (single-label lesions only), marked
                attrs['hard'] = 1 (the key exists only when hard_rate > 0); which samples are
                hard, and how hard, come from their own RNG streams, so every other sample (and
                hard_rate = 0: the whole set) is drawn exactly as without the knob
  hard_kind     'small' (radius x 0.3-0.45), 'low_contrast' (lesion colour 12-25% of the way
                from the skin tone to its usual colour) or 'both' (small and faint at once)
  seed          everything (labels, attributes, images) is a function of (seed, index)

Records follow the jaxmed contract: image uint8 HxWx3, label (int or float multi-hot), attrs
{'bias': int}, index, and with `with_mask` a mask uint8 HxW (255 = lesion; all glyphs in
multi-label mode).
"""

from __future__ import annotations

import dataclasses

import numpy as np

PALETTE = np.array([  # distinct lesion / glyph colours (RGB)
    [90, 40, 30], [40, 70, 150], [150, 30, 120], [30, 120, 60], [200, 120, 20], [20, 20, 20],
    [160, 160, 30], [30, 150, 150], [110, 60, 170], [190, 40, 40], [70, 110, 40], [40, 40, 100],
    [230, 90, 150], [100, 100, 100], [10, 90, 110], [140, 80, 10], [60, 170, 110],
    [170, 110, 200], [220, 200, 60], [90, 0, 60]], np.float32)
TONES = np.array([[225, 190, 165], [120, 80, 60], [180, 140, 110], [90, 60, 45]], np.float32)
LOBES = (0, 3, 5, 7, 2, 4, 6, 8, 9, 10)
HARD_KINDS = ("small", "low_contrast", "both")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    num_classes: int = 4
    num_samples: int = 2000
    image_size: int = 64
    imbalance: float = 1.0
    bias_rate: float | None = None
    num_attr_values: int = 2
    class_cue: str = "color_shape"
    multi_label: bool = False
    noise: float = 8.0
    seed: int = 0
    with_mask: bool = False  # records carry the lesion mask (localisation tasks)
    hard_rate: float = 0.0  # rare hard sub-population (see the module docstring)
    hard_kind: str = "small"  # 'small' | 'low_contrast' | 'both'

    def __post_init__(self):
        if self.class_cue not in ("color_shape", "shape"):
            raise ValueError(f"class_cue must be 'color_shape' or 'shape', got {self.class_cue!r}")
        if not 0 < self.imbalance <= 1:
            raise ValueError(f"imbalance is n_min / n_max in (0, 1], got {self.imbalance}")
        if self.num_classes > len(PALETTE):
            raise ValueError(f"at most {len(PALETTE)} synthetic classes")
        if not 0.0 <= self.hard_rate <= 1.0:
            raise ValueError(f"hard_rate must be in [0, 1], got {self.hard_rate}")
        if self.hard_kind not in HARD_KINDS:
            raise ValueError(f"hard_kind must be one of {HARD_KINDS}, got {self.hard_kind!r}")
        if self.hard_rate > 0 and self.multi_label:
            raise ValueError("hard_rate applies to single-label lesions, not multi_label glyphs")


def class_counts(num_samples: int, num_classes: int, imbalance: float) -> np.ndarray:
    """Geometric long tail n_c proportional to imbalance^(c / (C - 1)), summing to num_samples."""
    w = imbalance ** (np.arange(num_classes) / max(num_classes - 1, 1))
    counts = np.floor(w / w.sum() * num_samples).astype(np.int64)
    counts[0] += num_samples - counts.sum()
    return np.maximum(counts, 1) if num_samples >= num_classes else counts


CACHE_BYTES = 256 * 2**20  # drawn images kept per process (drawing costs ~0.6 ms at 32 px)


class SyntheticSource:
    """Random-access source; images are drawn on first access and kept (per process) while the
    whole set fits in CACHE_BYTES, since every epoch would otherwise redraw them."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        size = spec.num_samples * spec.image_size**2 * (3 + spec.with_mask)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = (
            {} if size <= CACHE_BYTES else None)
        rng = np.random.default_rng([spec.seed, 0])
        c, n = spec.num_classes, spec.num_samples
        if spec.multi_label:
            prevalence = 0.35 * spec.imbalance ** (np.arange(c) / max(c - 1, 1))
            self.labels = (rng.random((n, c)) < prevalence).astype(np.float32)
        else:
            self.labels = rng.permutation(np.repeat(np.arange(c), class_counts(n, c,
                                                                               spec.imbalance)))
        a = spec.num_attr_values
        base = (self.labels.argmax(-1) if spec.multi_label else self.labels) % a
        if spec.bias_rate is None:
            self.bias = rng.integers(0, a, n)
        else:
            aligned = rng.random(n) < spec.bias_rate
            other = (base + rng.integers(1, a, n)) % a if a > 1 else base
            self.bias = np.where(aligned, base, other)
        # its own stream: drawing it (or not) leaves every other draw above and below unchanged
        self.hard = (np.random.default_rng([spec.seed, 5]).random(n) < spec.hard_rate
                     if spec.hard_rate > 0 else np.zeros(n, bool))

    def __len__(self) -> int:
        return self.spec.num_samples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if self._cache is None:
            image, mask = self.draw(index)
        else:
            if index not in self._cache:
                self._cache[index] = self.draw(index)
            image, mask = (a.copy() for a in self._cache[index])
        label = self.labels[index]
        rec = {"image": image,
               "label": label.astype(np.float32) if self.spec.multi_label else np.int32(label),
               "attrs": {"bias": np.int32(self.bias[index])}, "index": np.int32(index)}
        if self.spec.hard_rate > 0:
            rec["attrs"]["hard"] = np.int32(self.hard[index])
        if self.spec.with_mask:
            rec["mask"] = mask * np.uint8(255)
        return rec

    def draw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.spec
        rng = np.random.default_rng([s.seed, 1, index])
        size = s.image_size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        tone = TONES[self.bias[index] % len(TONES)] + rng.normal(0, 6, 3)
        texture = sum(rng.uniform(0, 10) * np.sin(2 * np.pi * (rng.uniform(1, 4) * xx * np.cos(t)
                      + rng.uniform(1, 4) * yy * np.sin(t)) + rng.uniform(0, 6.3))
                      for t in rng.uniform(0, np.pi, 3))
        img = tone[None, None, :] + texture[..., None]
        if s.multi_label:
            mask = self._draw_glyphs(img, np.flatnonzero(self.labels[index]), xx, yy, rng)
        else:
            mask = self._draw_lesion(img, int(self.labels[index]), xx, yy, rng,
                                     self._hardness(index), tone)
        img += rng.normal(0, s.noise, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8), mask

    def _hardness(self, index: int) -> tuple[float, float]:
        """(radius scale, contrast) of a sample: (1, 1) unless it is hard; drawn from the
        sample's own hard stream, never from its image stream."""
        if not self.hard[index]:
            return 1.0, 1.0
        rng = np.random.default_rng([self.spec.seed, 6, index])
        scale, contrast = rng.uniform(0.3, 0.45), rng.uniform(0.12, 0.25)
        kind = self.spec.hard_kind
        return (scale if kind in ("small", "both") else 1.0,
                contrast if kind in ("low_contrast", "both") else 1.0)

    def _draw_lesion(self, img, label, xx, yy, rng, hardness=(1.0, 1.0), tone=None):
        s = self.spec
        cy, cx = 0.5 + rng.uniform(-0.12, 0.12, 2)
        r0 = rng.uniform(0.17, 0.27) * hardness[0]
        lobes = LOBES[label % len(LOBES)] + 2 * (label // len(LOBES))
        theta = np.arctan2(yy - cy, xx - cx)
        dist = np.hypot(yy - cy, xx - cx)
        radius = r0 * (1 + (0.35 if lobes else 0.0) * np.cos(lobes * theta + rng.uniform(0, 6.3)))
        inside = dist < radius
        color = PALETTE[label] if s.class_cue == "color_shape" else PALETTE[0]
        color = color + rng.normal(0, 10, 3)
        shade = np.clip(1.0 - dist / np.maximum(radius, 1e-6), 0, 1)[..., None]
        lesion = color[None, None, :] * (0.75 + 0.25 * (1 - shade))
        if hardness[1] != 1.0:  # faint: part of the way from the skin tone to the lesion
            lesion = tone[None, None, :] + hardness[1] * (lesion - tone[None, None, :])
        img[inside] = lesion[inside]
        return inside.astype(np.uint8)

    def _draw_glyphs(self, img, present, xx, yy, rng):
        mask = np.zeros(xx.shape, bool)
        for c in present:
            cy, cx = rng.uniform(0.15, 0.85, 2)
            r = rng.uniform(0.07, 0.11)
            if c % 3 == 0:
                region = np.hypot(yy - cy, xx - cx) < r
            elif c % 3 == 1:
                region = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            else:
                region = ((np.abs(yy - cy) < r) & (np.abs(xx - cx) < r / 3)) | (
                    (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r / 3))
            img[region] = PALETTE[c] + rng.normal(0, 8, 3)
            mask |= region
        return mask.astype(np.uint8)

    @property
    def class_counts(self) -> np.ndarray:
        if self.spec.multi_label:
            return self.labels.sum(0).astype(np.int64)
        return np.bincount(self.labels, minlength=self.spec.num_classes)
