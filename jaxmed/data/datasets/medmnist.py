"""MedMNIST `.npz` files (train/val/test_images, train/val/test_labels), e.g. pneumoniamnist.npz
(28 px grayscale, binary) or chestmnist.npz (14 findings, multi-label)."""

from __future__ import annotations

import os

import numpy as np

from jaxmed.data import Dataset, register
from jaxmed.data.datasets import tables as T
from jaxmed.data.sources import ArraySource, DatasetInfo

KNOWN_CLASSES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "dermamnist": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                   "pleural", "hernia"],
}


@register("medmnist")
def medmnist(cfg) -> Dataset:
    path = cfg.root
    if not os.path.isfile(path):
        raise FileNotFoundError(f"medmnist: config.data.root must be a MedMNIST .npz file; "
                                f"not found: {path}")
    with np.load(path) as z:
        keys = set(z.files)
        need = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
        missing = [k for k in need if k not in keys]
        if missing:
            raise T.DataFormatError(f"{path}: a MedMNIST file holds {need}; missing {missing}, "
                                    f"found {sorted(keys)}")
        arrays = {k: z[k] for k in need}
    labels = arrays["train_labels"]
    multi = labels.ndim == 2 and labels.shape[1] > 1
    stem = os.path.splitext(os.path.basename(path))[0].split("_")[0]
    if multi:
        num_classes = labels.shape[1]
    else:
        num_classes = int(max(arrays[f"{s}_labels"].max() for s in ("train", "val", "test"))) + 1
    names = KNOWN_CLASSES.get(stem, [f"class_{i}" for i in range(num_classes)])
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    splits = {}
    for s in ("train", "val", "test"):
        images = arrays[f"{s}_images"]
        if images.dtype != np.uint8:
            raise T.DataFormatError(f"{path}: {s}_images has dtype {images.dtype}, expected uint8")
        y = arrays[f"{s}_labels"]
        y = y.astype(np.float32) if multi else y.reshape(-1).astype(np.int64)
        splits[s] = ArraySource(images, y)
    channels = 1 if arrays["train_images"].ndim == 3 else arrays["train_images"].shape[-1]
    return Dataset(splits, DatasetInfo("medmnist", names, multi, channels,
                                       image_size=arrays["train_images"].shape[1]))
