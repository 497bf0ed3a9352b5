"""Random-access sources and the dataset description every method reads.

A source is anything with `__len__` and `__getitem__(i) -> record`, where a record is the
jaxmed contract: `image` (uint8 HxWxC array, an image file path, or encoded bytes), `label` (int
or float multi-hot), `attrs` (dict of ints; -1 = unknown), `index` (stable int id) and, for
localisation, `mask` (uint8 HxW, or a path). Decoding happens later, in grain workers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class DatasetInfo:
    """What a model and a method need to know about a dataset."""

    name: str
    class_names: list[str]
    multi_label: bool
    channels: int  # native channels of the images (1 = grayscale)
    image_size: int | None = None  # native size when all images share one (MedMNIST)
    attr_names: list[str] = dataclasses.field(default_factory=list)
    class_counts: np.ndarray | None = None  # training-split counts (positives if multi-label)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ArraySource:
    """Images held in memory (MedMNIST .npz, test fixtures)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 attrs: Mapping[str, np.ndarray] | None = None, masks: np.ndarray | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.attrs = {k: np.asarray(v) for k, v in (attrs or {}).items()}
        self.masks = masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        img = self.images[i]
        rec = {"image": img if img.ndim == 3 else img[..., None], "label": _label(self.labels[i]),
               "attrs": {k: np.int32(v[i]) for k, v in self.attrs.items()}, "index": np.int32(i)}
        if self.masks is not None:
            rec["mask"] = self.masks[i]
        return rec


class TableSource:
    """Rows of a metadata table: an image path, a label and attributes per row.

    `files` are absolute paths; `names` are what a person would look up (the CSV's image id)."""

    def __init__(self, files: Sequence[str], labels: np.ndarray,
                 attrs: Mapping[str, np.ndarray] | None = None,
                 mask_files: Sequence[str] | None = None, ids: Sequence[int] | None = None):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = list(files)
        self.labels = np.asarray(labels)
        self.attrs = {k: np.asarray(v) for k, v in (attrs or {}).items()}
        self.mask_files = list(mask_files) if mask_files is not None else None
        self.ids = np.arange(len(self.files)) if ids is None else np.asarray(ids)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        rec = {"image": self.files[i], "label": _label(self.labels[i]),
               "attrs": {k: np.int32(v[i]) for k, v in self.attrs.items()},
               "index": np.int32(self.ids[i])}
        if self.mask_files is not None:
            rec["mask"] = self.mask_files[i]
        return rec

    def subset(self, keep: np.ndarray) -> "TableSource":
        keep = np.asarray(keep)
        return TableSource([self.files[k] for k in keep], self.labels[keep],
                           {a: v[keep] for a, v in self.attrs.items()},
                           [self.mask_files[k] for k in keep] if self.mask_files else None,
                           self.ids[keep])

    def missing_files(self) -> list[str]:
        """Files (images and masks) not on disk. Each folder is listed once instead of one stat
        per file: cheap for 100k-image datasets on network disks."""
        listed: dict[str, frozenset] = {}
        out = []
        for p in self.files + (self.mask_files or []):
            folder, name = os.path.split(p)
            if folder not in listed:
                try:
                    listed[folder] = frozenset(os.listdir(folder or "."))
                except OSError:  # no such folder (or not a folder): everything in it is missing
                    listed[folder] = frozenset()
            if name not in listed[folder]:
                out.append(p)
        return out


class SubsetSource:
    """A view on some indices of another source (task splits, labeled subsets)."""

    def __init__(self, parent: Any, indices: np.ndarray):
        self.parent, self.indices = parent, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.parent[int(self.indices[int(i)])]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.parent.labels)[self.indices]


def _label(y):
    y = np.asarray(y)
    return y.astype(np.float32) if y.ndim else np.int32(y)


def source_labels(source) -> np.ndarray:
    """Labels of a source without decoding images."""
    if hasattr(source, "labels"):
        return np.asarray(source.labels)
    return np.stack([np.asarray(source[i]["label"]) for i in range(len(source))])


def source_attrs(source) -> dict[str, np.ndarray]:
    if isinstance(source, SubsetSource):
        return {k: v[source.indices] for k, v in source_attrs(source.parent).items()}
    if hasattr(source, "attrs") and isinstance(source.attrs, Mapping):
        return {k: np.asarray(v) for k, v in source.attrs.items()}
    if hasattr(source, "bias"):
        return {"bias": np.asarray(source.bias)}
    recs = [source[i]["attrs"] for i in range(len(source))]
    return {k: np.array([r[k] for r in recs]) for k in (recs[0] if recs else {})}


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.sum(0).astype(np.int64)
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


def record_indices(source) -> np.ndarray:
    """The stable `index` of every record, without decoding images."""
    if isinstance(source, TaskSource):
        return record_indices(source.parent)
    if isinstance(source, ConcatSource):
        return np.concatenate([record_indices(p) for p in source.parts] or [np.zeros(0, int)])
    if isinstance(source, SubsetSource):
        parent = source.parent
        if isinstance(parent, TableSource):
            return parent.ids[source.indices].astype(np.int64)
        if hasattr(parent, "labels") and not hasattr(parent, "ids"):
            return source.indices.copy()  # array-like sources: index == position
    if isinstance(source, TableSource):
        return source.ids.astype(np.int64)
    if (not isinstance(source, SubsetSource) and hasattr(source, "labels")
            and not hasattr(source, "ids")):
        return np.arange(len(source), dtype=np.int64)  # array-like sources: index == position
    return np.asarray([int(source[i]["index"]) for i in range(len(source))], np.int64)


def split_by_class_groups(source, groups: list[list[int]]) -> list[SubsetSource]:
    """One source per task, holding the samples whose (single) label is in the task's classes."""
    labels = source_labels(source)
    if labels.ndim != 1:
        raise ValueError("class-incremental task splits need single-label data")
    seen = [c for g in groups for c in g]
    if len(seen) != len(set(seen)):
        raise ValueError(f"class groups overlap: {groups}")
    return [SubsetSource(source, np.flatnonzero(np.isin(labels, g))) for g in groups]


class TaskSource:
    """A task's view of a source: within-task labels and the task id on every record."""

    def __init__(self, parent, task: int, label_map: dict[int, int]):
        self.parent, self.task, self.label_map = parent, task, label_map
        self.labels = np.asarray([label_map[int(y)] for y in source_labels(parent)]
                                 if len(parent) else [], np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, i):
        rec = dict(self.parent[i])
        rec["label"] = np.int32(self.label_map[int(rec["label"])])
        rec["attrs"] = {**rec["attrs"], "task": np.int32(self.task)}
        return rec


class ConcatSource:
    """Several sources one after another (joint training on all tasks so far)."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.labels = np.concatenate([p.labels for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, int(i), side="right") - 1)
        return self.parts[k][int(i) - int(self.offsets[k])]
