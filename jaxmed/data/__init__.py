"""Datasets by name: `build(config.data)` -> `Dataset` (train / val / test sources + info).

`config.data.name` picks the adapter, `config.data.root` is the folder (or file) of the official
download and `config.data.split_file` an optional split list; `default_config()` lists every key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from jaxmed.data import longtail
from jaxmed.data.images import ImageError, decode_image
from jaxmed.data.sources import (DatasetInfo, SubsetSource, TableSource, class_counts,
                                 source_labels)
from jaxmed.data.synthetic import SyntheticSource, SyntheticSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Dataset:
    splits: dict[str, Any]
    info: DatasetInfo

    def __getitem__(self, split: str):
        if split not in self.splits:
            raise KeyError(f"dataset {self.info.name!r} has no split {split!r}; it has "
                           f"{sorted(self.splits)}")
        return self.splits[split]


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "synthetic"
    c.root = ""  # folder (or .npz file) of the official download
    c.split_file = ""  # optional split list / CSV (see each adapter)
    c.image_size = 64  # images are resized to image_size x image_size (MedMNIST keeps its own)
    c.num_classes = 0  # 0 = from the data; > 0 states the class count (see `build`)
    c.channels = 0  # 0 = the data's own channels; 1 or 3 to force
    c.train_augment = "flip"  # host augmentation chain (jaxmed.data.augment)
    c.on_error = "raise"  # 'raise' or 'skip' for missing / corrupt images
    c.num_workers = 0  # grain worker processes for decode + augment
    c.train_imbalance = 1.0  # < 1: a long-tailed subsample of the train split, n_min / n_max
    # (jaxmed.data.longtail; info.class_counts are then the subsample's)
    c.split_seed = 0  # which images the long-tailed subsample keeps
    c.val_fraction = 0.1  # when a dataset has no official validation split (group-wise)
    c.test_fraction = 0.2  # when a dataset has no official test split (group-wise)
    c.synthetic = ml_collections.ConfigDict(dict(
        num_classes=4, num_train=2000, num_val=400, num_test=800, imbalance=1.0,
        test_imbalance=1.0, bias_rate=ml_collections.config_dict.placeholder(float),
        test_bias_rate=ml_collections.config_dict.placeholder(float), num_attr_values=2,
        class_cue="color_shape", multi_label=False,
        with_mask=False,  # records carry lesion masks (segmentation, localisation)
        hard_rate=0.0, hard_kind="small"))  # a rare hard sub-population (attrs['hard'])
    return c


def _synthetic(cfg) -> Dataset:
    s = cfg.synthetic
    size = cfg.image_size
    base = dict(num_classes=s.num_classes, image_size=size, class_cue=s.class_cue,
                multi_label=s.multi_label, num_attr_values=s.num_attr_values,
                with_mask=s.with_mask, hard_rate=s.hard_rate, hard_kind=s.hard_kind)
    train = SyntheticSource(SyntheticSpec(num_samples=s.num_train, imbalance=s.imbalance,
                                          bias_rate=s.bias_rate, seed=1, **base))
    val = SyntheticSource(SyntheticSpec(num_samples=s.num_val, imbalance=s.imbalance,
                                        bias_rate=s.bias_rate, seed=2, **base))
    test = SyntheticSource(SyntheticSpec(num_samples=s.num_test, imbalance=s.test_imbalance,
                                         bias_rate=s.test_bias_rate, seed=3, **base))
    names = [f"class_{c}" for c in range(s.num_classes)]
    info = DatasetInfo("synthetic", names, bool(s.multi_label), 3, size,
                       ["bias", "hard"] if s.hard_rate > 0 else ["bias"], train.class_counts)
    return Dataset({"train": train, "val": val, "test": test}, info)


BUILDERS: dict[str, Callable[[Any], Dataset]] = {"synthetic": _synthetic}


def register(name: str):
    def deco(fn):
        BUILDERS[name] = fn
        return fn
    return deco


def build(cfg, *, check_files: bool = True) -> Dataset:
    """Build the dataset a config names; unknown names fail listing the known ones.

    Checked here, before any training step (and cheaply: tables and folder listings, one
    decode per split at most):
      * an image file in two splits (or twice in one) fails naming it (`check_disjoint`);
      * image files a table names but the disk lacks, in any split, fail naming them
        (on_error='raise') or are dropped and counted (on_error='skip');
      * with on_error='skip', a split left with no usable sample (every file missing or
        unreadable) fails naming the split and the count skipped (`check_usable`).
      * a class (or finding) with samples in val / test but none in train fails naming the
        data file, the split, the class and its count (`check_classes_in_train`): a model
        never taught a class cannot be measured on it, and for files whose class count comes
        from their labels (MedMNIST of unknown name) it would widen the head unnoticed.
        Stating `config.data.num_classes` (> 0) accepts it; the stated count must then
        equal the dataset's (a fixed list of class names) or bound its labels (MedMNIST).
    Other corrupt files surface when decoded. `check_files=False` (the inspect CLI, which
    verifies every file itself) skips the file checks, not the split check."""
    check_config(cfg)
    ds = BUILDERS[cfg.name](cfg)
    check_disjoint(ds)
    if check_files:
        _check_files(ds, cfg.on_error)
        if cfg.on_error == "skip":
            for split, source in ds.splits.items():
                check_usable(source, split, ds.info.name)
    imbalance = cfg.get("train_imbalance", 1.0)
    if imbalance != 1.0 and "train" in ds.splits:
        long_tail(ds, imbalance, int(cfg.get("split_seed", 0)), data_origin(cfg))
    stated = int(cfg.get("num_classes", 0) or 0)
    if stated and stated != ds.info.num_classes:
        raise ValueError(f"config.data.num_classes={stated} but {ds.info.name} "
                         f"({data_origin(cfg)}) has {ds.info.num_classes} classes "
                         f"{ds.info.class_names[:8]}; set it to {ds.info.num_classes}, or 0 "
                         "(from the data)")
    labels = {split: source_labels(source) for split, source in ds.splits.items()}
    if ds.info.class_counts is None and "train" in labels:
        ds.info.class_counts = class_counts(labels["train"], ds.info.num_classes)
    check_classes_in_train(ds, labels, data_origin(cfg), stated=bool(stated))
    return ds


def long_tail(ds: Dataset, imbalance: float, seed: int, origin: str = "") -> None:
    """Replace the train split by its long-tailed subsample (`jaxmed.data.longtail`), with
    `info.class_counts` the subsample's; records keep their stable `index`."""
    source = ds.splits["train"]
    where = f"the train split of {ds.info.name}" + (f" ({origin})" if origin else "")
    keep = longtail.subsample_indices(source_labels(source), imbalance, seed,
                                      class_names=ds.info.class_names, where=where)
    ds.splits["train"] = (source.subset(keep) if isinstance(source, TableSource)
                          else SubsetSource(source, keep))
    ds.info.class_counts = class_counts(source_labels(ds.splits["train"]), ds.info.num_classes)
    log.info("%s: long-tailed subsample (train_imbalance=%g, split_seed=%d): %d of %d images, "
             "class counts %s", where, imbalance, seed, len(keep), len(source),
             ds.info.class_counts.tolist())


def check_config(cfg) -> None:
    """Values of config.data no dataset can use, refused naming the key (a ValueError) before
    any file is read; called by `build`, and cheap enough for a method's `check_config`."""
    _load_adapters()
    if cfg.name not in BUILDERS:
        raise ValueError(f"config.data.name={cfg.name!r} is not a known dataset; known: "
                         f"{sorted(BUILDERS)}")
    if cfg.get("on_error", "raise") not in ("raise", "skip"):
        raise ValueError(f"config.data.on_error={cfg.on_error!r}: use 'raise' or 'skip'")
    n = cfg.get("num_classes", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n == 1:
        raise ValueError(f"config.data.num_classes={n!r}: 0 (the class count from the data) "
                         "or the number of classes (>= 2)")
    longtail.check_imbalance(cfg.get("train_imbalance", 1.0))
    seed = cfg.get("split_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"config.data.split_seed={seed!r}: an integer seed")
    if cfg.name == "synthetic" and "synthetic" in cfg:
        s = cfg.synthetic
        for key in ("imbalance", "test_imbalance"):
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"config.data.synthetic.{key}={v!r}: n_min / n_max of the "
                                 "class counts, in (0, 1] (1.0 = balanced, 0.01 = a long tail)")
        for key in ("bias_rate", "test_bias_rate"):
            v = s.get(key)
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"config.data.synthetic.{key}={v!r}: a probability in [0, 1] "
                                 "(or unset: no spurious attribute)")
        if not 0 <= s.get("hard_rate", 0.0) <= 1:
            raise ValueError(f"config.data.synthetic.hard_rate={s.hard_rate!r}: a fraction in "
                             "[0, 1]")


def data_origin(cfg) -> str:
    """The file or folder a dataset was read from, for messages."""
    if cfg.name == "synthetic" or not (cfg.root or cfg.split_file):
        return f"config.data.name={cfg.name!r}"
    return ", ".join(p for p in (cfg.root, cfg.split_file) if p)


def check_classes_in_train(ds: Dataset, labels: dict[str, np.ndarray], origin: str, *,
                           stated: bool = False) -> None:
    """Refuse a class (a finding, if multi-label) that has samples in val or test but none in
    train, naming the data, the split, the class and its count; with `stated` (the user set
    config.data.num_classes) only a warning is logged."""
    if "train" not in labels:
        return
    c = ds.info.num_classes

    def counts(y):
        y = np.asarray(y)
        if y.ndim == 2:
            return (y > 0).sum(0).astype(np.int64)[:c]
        return np.bincount(y.astype(np.int64), minlength=c)[:c] if y.size else np.zeros(c, int)

    unseen = counts(labels["train"]) == 0
    if not unseen.any():
        return
    what = "positive(s)" if ds.info.multi_label else "sample(s)"
    parts = []
    for split, y in labels.items():
        k = counts(y)
        bad = np.flatnonzero(unseen & (k > 0))
        if split == "train" or not bad.size:
            continue
        shown = ", ".join(f"class {int(i)} ({ds.info.class_names[i]!r}): {int(k[i])}"
                          for i in bad[:5])
        parts.append(f"{bad.size} class(es) with {what} in the {split} split but none in "
                     f"train: {shown}{', ...' if bad.size > 5 else ''}")
    if not parts:
        return
    msg = f"{ds.info.name} ({origin}): {'; '.join(parts)}"
    if stated:
        log.warning("%s (accepted: config.data.num_classes is set)", msg)
        return
    raise ValueError(f"{msg}; a model cannot learn a class it never sees. Fix the split, or "
                     f"state the class count (config.data.num_classes={c}) to train anyway")


def check_disjoint(ds: Dataset) -> None:
    """Every image file in at most one split, once: a repeated file would put test images in
    training (or weigh an image twice). Fails naming the files and their splits."""
    from jaxmed.data.datasets.tables import DataFormatError

    seen: dict[str, str] = {}
    dups = []
    for split, source in ds.splits.items():
        if not isinstance(source, TableSource):
            continue
        for f in source.files:
            key = os.path.normpath(f)
            if key in seen:
                dups.append(f"{f} ({seen[key]} and {split})")
            else:
                seen[key] = split
    if dups:
        raise DataFormatError(f"{ds.info.name}: {len(dups)} image file(s) appear more than once "
                              f"across the splits, e.g. {dups[:5]}; remove the repeated rows")


def _check_files(ds: Dataset, on_error: str) -> None:
    """Missing files of every split, reported together (test included) before training."""
    missing = {}
    for split, source in ds.splits.items():
        if isinstance(source, TableSource):
            gone = set(source.missing_files())
            if gone:
                missing[split] = (source, gone)
    if not missing:
        return
    name = ds.info.name
    if on_error == "raise":
        parts = [f"{split}: {len(gone)} (e.g. {sorted(gone)[:5]})"
                 for split, (_, gone) in missing.items()]
        raise ImageError(f"{name}: image file(s) not found in {'; '.join(parts)}; fix the root "
                         "or set config.data.on_error='skip'")
    for split, (source, gone) in missing.items():
        keep = [i for i, f in enumerate(source.files) if f not in gone and
                (source.mask_files is None or source.mask_files[i] not in gone)]
        skipped = len(source) - len(keep)
        if not keep:
            raise ImageError(f"{name} ({split}): no usable sample: all {skipped} rows skipped "
                             f"because their files are missing (on_error='skip'), e.g. "
                             f"{sorted(gone)[:5]}")
        log.warning("%s (%s): skipped %d of %d rows whose files are missing (on_error='skip')",
                    name, split, skipped, len(source))
        ds.splits[split] = source.subset(np.asarray(keep, np.int64))


def check_usable(source, split: str, name: str = "dataset") -> None:
    """Fail unless some record of `source` decodes: with on_error='skip' a split of unreadable
    files would otherwise train on nothing (every sample valid=0) or evaluate nothing.

    Records are tried in order and the first that decodes ends the check, so a healthy split
    costs one small decode (JPEG draft mode); only a split with no good file is read in full.
    In-memory images (arrays) count as usable without decoding."""
    reasons = []
    for i in range(len(source)):
        rec = source[i]
        try:
            for key in ("image", "mask"):
                data = rec.get(key)
                if data is not None and not isinstance(data, np.ndarray):
                    decode_image(data, size=(8, 8), channels=1, nearest=key == "mask",
                                 name=data if isinstance(data, str) else
                                 f"{key} of record {rec['index']}")
            return
        except ImageError as e:
            reasons.append(str(e))
    if reasons:
        raise ImageError(f"{name} ({split}): no usable sample: all {len(reasons)} images are "
                         f"unreadable and would be skipped (on_error='skip'), e.g. {reasons[:3]}")


def image_size(cfg, info: DatasetInfo) -> int:
    """Datasets stored at one native size (MedMNIST) keep it; others resize to cfg.image_size."""
    return int(info.image_size or cfg.image_size)


def _load_adapters() -> None:
    import jaxmed.data.datasets  # noqa: F401  (registers the real-dataset adapters)


def image_channels(cfg, info: DatasetInfo) -> int:
    return int(cfg.channels) if cfg.channels else info.channels


__all__ = ["BUILDERS", "Dataset", "DatasetInfo", "ImageError", "SPLITS", "SubsetSource",
           "SyntheticSource", "SyntheticSpec", "TableSource", "build", "check_classes_in_train",
           "check_config", "check_disjoint", "check_usable", "data_origin",
           "class_counts", "decode_image", "default_config", "image_channels", "image_size",
           "long_tail", "register", "source_labels"]
