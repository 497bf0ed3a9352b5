"""Datasets by name: `build(config.data)` -> `Dataset` (train / val / test sources + info).

`config.data.name` picks the adapter, `config.data.root` is the folder (or file) of the official
download and `config.data.split_file` an optional split list; `default_config()` lists every key.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import ml_collections
import numpy as np

from jaxmed.data.images import ImageError
from jaxmed.data.sources import DatasetInfo, TableSource, class_counts, source_labels
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
    c.channels = 0  # 0 = the data's own channels; 1 or 3 to force
    c.train_augment = "flip"  # host augmentation chain (jaxmed.data.augment)
    c.on_error = "raise"  # 'raise' or 'skip' for missing / corrupt images
    c.num_workers = 0  # grain worker processes for decode + augment
    c.val_fraction = 0.1  # when a dataset has no official validation split (group-wise)
    c.test_fraction = 0.2  # when a dataset has no official test split (group-wise)
    c.synthetic = ml_collections.ConfigDict(dict(
        num_classes=4, num_train=2000, num_val=400, num_test=800, imbalance=1.0,
        test_imbalance=1.0, bias_rate=ml_collections.config_dict.placeholder(float),
        test_bias_rate=ml_collections.config_dict.placeholder(float), num_attr_values=2,
        class_cue="color_shape", multi_label=False))
    return c


def _synthetic(cfg) -> Dataset:
    s = cfg.synthetic
    size = cfg.image_size
    base = dict(num_classes=s.num_classes, image_size=size, class_cue=s.class_cue,
                multi_label=s.multi_label, num_attr_values=s.num_attr_values)
    train = SyntheticSource(SyntheticSpec(num_samples=s.num_train, imbalance=s.imbalance,
                                          bias_rate=s.bias_rate, seed=1, **base))
    val = SyntheticSource(SyntheticSpec(num_samples=s.num_val, imbalance=s.imbalance,
                                        bias_rate=s.bias_rate, seed=2, **base))
    test = SyntheticSource(SyntheticSpec(num_samples=s.num_test, imbalance=s.test_imbalance,
                                         bias_rate=s.test_bias_rate, seed=3, **base))
    names = [f"class_{c}" for c in range(s.num_classes)]
    info = DatasetInfo("synthetic", names, bool(s.multi_label), 3, size, ["bias"],
                       train.class_counts)
    return Dataset({"train": train, "val": val, "test": test}, info)


BUILDERS: dict[str, Callable[[Any], Dataset]] = {"synthetic": _synthetic}


def register(name: str):
    def deco(fn):
        BUILDERS[name] = fn
        return fn
    return deco


def build(cfg, *, check_files: bool = True) -> Dataset:
    """Build the dataset a config names; unknown names fail listing the known ones.

    Image files a table names but the disk lacks fail here, naming them (on_error='raise'), or
    are dropped and counted (on_error='skip'); corrupt files surface when decoded."""
    _load_adapters()
    if cfg.name not in BUILDERS:
        raise ValueError(f"config.data.name={cfg.name!r} is not a known dataset; known: "
                         f"{sorted(BUILDERS)}")
    if cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"config.data.on_error={cfg.on_error!r}: use 'raise' or 'skip'")
    ds = BUILDERS[cfg.name](cfg)
    if check_files:
        for split, source in list(ds.splits.items()):
            ds.splits[split] = _check_files(source, split, cfg.on_error, cfg.name)
    if ds.info.class_counts is None:
        ds.info.class_counts = class_counts(source_labels(ds["train"]), ds.info.num_classes)
    return ds


def _check_files(source, split: str, on_error: str, name: str):
    if not isinstance(source, TableSource):
        return source
    missing = set(source.missing_files())
    if not missing:
        return source
    if on_error == "raise":
        shown = sorted(missing)[:5]
        raise ImageError(f"{name} ({split}): {len(missing)} image file(s) not found, e.g. "
                         f"{shown}; fix the root or set config.data.on_error='skip'")
    keep = [i for i, f in enumerate(source.files) if f not in missing and
            (source.mask_files is None or source.mask_files[i] not in missing)]
    log.warning("%s (%s): skipped %d rows whose files are missing (on_error='skip')", name,
                split, len(source) - len(keep))
    return source.subset(np.asarray(keep, np.int64))


def image_size(cfg, info: DatasetInfo) -> int:
    """Datasets stored at one native size (MedMNIST) keep it; others resize to cfg.image_size."""
    return int(info.image_size or cfg.image_size)


def _load_adapters() -> None:
    import jaxmed.data.datasets  # noqa: F401  (registers the real-dataset adapters)


def image_channels(cfg, info: DatasetInfo) -> int:
    return int(cfg.channels) if cfg.channels else info.channels


__all__ = ["Dataset", "DatasetInfo", "build", "default_config", "register"]
