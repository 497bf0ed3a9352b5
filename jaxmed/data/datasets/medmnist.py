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


SPLIT_NAMES = ("train", "val", "test")


def _load(path: str) -> dict[str, np.ndarray]:
    need = [f"{s}_{k}" for s in SPLIT_NAMES for k in ("images", "labels")]
    try:
        z = np.load(path)
    except Exception as e:  # noqa: BLE001 - any reader failure means "not an npz"
        raise T.DataFormatError(f"{path}: not a readable MedMNIST .npz file ({type(e).__name__}: "
                                f"{e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise T.DataFormatError(f"{path}: a MedMNIST file is an .npz archive of {need}; this is "
                                f"a single {type(z).__name__}")
    with z:
        missing = [k for k in need if k not in z.files]
        if missing:
            raise T.DataFormatError(f"{path}: a MedMNIST file holds {need}; missing {missing}, "
                                    f"found {sorted(z.files)}")
        arrays = {}
        for k in need:
            try:
                arrays[k] = z[k]
            except Exception as e:  # noqa: BLE001 - pickled / truncated member
                raise T.DataFormatError(f"{path}: cannot read {k} ({type(e).__name__}: {e})"
                                        ) from None
    return arrays


def _check_split(path: str, s: str, images: np.ndarray, y: np.ndarray, *, multi: bool,
                 num_classes: int, known: bool, hw: tuple, stated: bool = False) -> None:
    """Every problem names the file and the split's array; labels must fit the class names."""
    where = f"{path} ({s} split)"
    if images.dtype != np.uint8:
        raise T.DataFormatError(f"{where}: {s}_images has dtype {images.dtype}, expected uint8")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise T.DataFormatError(f"{where}: {s}_images has shape {images.shape}, expected "
                                "(N, H, W) or (N, H, W, 1 or 3)")
    if images.shape[1:3] != hw:
        raise T.DataFormatError(f"{where}: {s}_images are {images.shape[1:3]} pixels, "
                                f"train_images {hw}")
    if len(images) != len(y):
        raise T.DataFormatError(f"{where}: {len(images)} images in {s}_images but {len(y)} "
                                f"labels in {s}_labels")
    if not np.issubdtype(y.dtype, np.number) or (y.size and not np.isfinite(y).all()):
        raise T.DataFormatError(f"{where}: {s}_labels holds {y.dtype} values, expected integers")
    if multi:
        if y.ndim != 2 or y.shape[1] != num_classes:
            raise T.DataFormatError(f"{where}: {s}_labels has shape {y.shape}, expected "
                                    f"(N, {num_classes}) multi-hot rows")
        bad = np.flatnonzero(~np.isin(y, (0, 1)).all(1))
        if bad.size:
            raise T.DataFormatError(f"{where}: {s}_labels row {int(bad[0])} is "
                                    f"{y[bad[0]].tolist()}; multi-hot labels are 0 / 1")
        return
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise T.DataFormatError(f"{where}: {s}_labels has shape {y.shape}, expected (N,) or (N, 1)")
    flat = y.reshape(-1)
    bad = np.flatnonzero((flat != np.round(flat)) | (flat < 0) | (flat >= num_classes))
    if bad.size:
        i = int(bad[0])
        limit = (f"the {num_classes} class names of this dataset" if known
                 else f"config.data.num_classes={num_classes}" if stated
                 else "non-negative integers")
        raise T.DataFormatError(f"{where}: {s}_labels[{i}] = {flat[i]} ({bad.size} bad labels); "
                                f"labels must be integers in [0, {num_classes}) for {limit}")


@register("medmnist")
def medmnist(cfg) -> Dataset:
    """config.data.root = the .npz file. Its stem names the dataset ('dermamnist_224.npz' ->
    dermamnist): a known stem fixes the class names and labels outside them are an error;
    other files get class_0..class_{max label over the three splits}, or
    class_0..class_{N-1} with config.data.num_classes=N (larger labels are an error). A class
    that only val / test hold is refused by `jaxmed.data.build` unless N is stated."""
    path = cfg.root
    if not os.path.isfile(path):
        raise FileNotFoundError(f"medmnist: config.data.root must be a MedMNIST .npz file; "
                                f"not found: {path}")
    arrays = _load(path)
    labels = arrays["train_labels"]
    multi = labels.ndim == 2 and labels.shape[1] > 1
    stem = os.path.splitext(os.path.basename(path))[0].split("_")[0]
    known = stem in KNOWN_CLASSES
    stated = int(cfg.get("num_classes", 0) or 0)
    if known:
        num_classes = len(KNOWN_CLASSES[stem])
    elif multi:
        num_classes = labels.shape[1]
    elif stated:
        num_classes = stated
    else:
        tops = [arrays[f"{s}_labels"].max() for s in SPLIT_NAMES if arrays[f"{s}_labels"].size]
        num_classes = max(int(max(tops, default=0)), 0) + 1
    names = KNOWN_CLASSES[stem] if known else [f"class_{i}" for i in range(num_classes)]
    hw = arrays["train_images"].shape[1:3]
    splits = {}
    for s in SPLIT_NAMES:
        images, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        _check_split(path, s, images, y, multi=multi, num_classes=num_classes, known=known,
                     hw=hw, stated=bool(stated) and not known and not multi)
        y = y.astype(np.float32) if multi else y.reshape(-1).astype(np.int64)
        splits[s] = ArraySource(images, y)
    channels = 1 if arrays["train_images"].ndim == 3 else arrays["train_images"].shape[-1]
    return Dataset(splits, DatasetInfo("medmnist", names, multi, channels,
                                       image_size=arrays["train_images"].shape[1]))
