"""Kvasir-Capsule (Smedsrud et al., Scientific Data 2021; TEAR's second dataset).

The official download (OSF dv2ag) as shipped under `config.data.root`:
    labelled_images/<class folder>/<frame>.jpg   14 class folders (`CLASSES`)
    metadata.csv     ';'-separated: filename;video_id;frame_number;finding_category;
                     finding_class;x1;y1;...  (one row per labelled frame; ',' also accepted)
    official_splits/split_0.csv, split_1.csv    (optional) the two official folds
The class is the image's folder, cross-checked against the row's finding_class (a mismatch
names the line). Splits: `config.data.split_file` = one official split CSV (a `filename`
column): it is the training set, the other fold the test set, and validation a video-wise
fraction of training; without one, a video-wise train / val / test split (frames of one
video never cross splits). Attribute `video` = the video id's code.
"""

from __future__ import annotations

import os

import numpy as np

from jaxmed.data import Dataset, register
from jaxmed.data.datasets import tables as T
from jaxmed.data.sources import DatasetInfo, TableSource

CLASSES = ["Ampulla of vater", "Angiectasia", "Blood - fresh", "Blood - hematin", "Erosion",
           "Erythema", "Foreign body", "Ileocecal valve", "Lymphangiectasia",
           "Normal clean mucosa", "Polyp", "Pylorus", "Reduced mucosal view", "Ulcer"]
LOOKUP = {T.norm(c): i for i, c in enumerate(CLASSES)}  # loosely compared class names


def _class_folders(images_root: str) -> dict[str, int]:
    """{file name: class} from the class folders; an unknown folder fails naming it."""
    found: dict[str, int] = {}
    for folder in sorted(os.listdir(images_root)):
        path = os.path.join(images_root, folder)
        if not os.path.isdir(path):
            continue
        if T.norm(folder) not in LOOKUP:
            raise T.DataFormatError(f"{path}: folder {folder!r} is not a Kvasir-Capsule class; "
                                    f"known: {CLASSES}")
        for name in os.listdir(path):
            if os.path.splitext(name)[1].lower() in T.IMAGE_EXTENSIONS:
                found[name] = LOOKUP[T.norm(folder)]
    return found


@register("kvasir_capsule")
def kvasir_capsule(cfg) -> Dataset:
    images_root = os.path.join(cfg.root, "labelled_images")
    if not os.path.isdir(images_root):
        raise FileNotFoundError(f"kvasir_capsule: no labelled_images/ folder under {cfg.root}")
    meta = T.read_csv(T.find_file(cfg.root, "metadata.csv"),
                      ["filename", "video_id", "finding_class"], dataset="Kvasir-Capsule",
                      delimiter=None)
    T.check_unique(meta, "filename")
    by_folder = _class_folders(images_root)
    files, labels = [], []
    for r, (name, finding) in enumerate(zip(meta.column("filename"),
                                            meta.column("finding_class"))):
        name = name.strip()
        if T.norm(finding) not in LOOKUP:
            raise T.DataFormatError(f"{meta.where(r)}: finding_class={finding!r} is not one of "
                                    f"{CLASSES}")
        label = LOOKUP[T.norm(finding)]
        if name in by_folder and by_folder[name] != label:
            raise T.DataFormatError(
                f"{meta.where(r)}: {name} is in the folder of {CLASSES[by_folder[name]]!r} but "
                f"the row says finding_class={finding!r}")
        files.append(os.path.join(images_root, CLASSES[label], name))
        labels.append(label)
    videos = [v.strip() for v in meta.column("video_id")]
    codes = {v: i for i, v in enumerate(sorted(set(videos)))}
    src = TableSource(files, np.asarray(labels, np.int64),
                      {"video": np.asarray([codes[v] for v in videos], np.int64)})
    info = DatasetInfo("kvasir_capsule", CLASSES, False, 3, attr_names=["video"])
    if not cfg.split_file:
        parts = T.group_split(videos, cfg.val_fraction, cfg.test_fraction)
        return Dataset({k: src.subset(v) for k, v in parts.items()}, info)
    d, fname = os.path.split(cfg.split_file)
    other = {"split_0.csv": "split_1.csv", "split_1.csv": "split_0.csv"}.get(fname)
    if other is None:
        raise T.DataFormatError(f"{cfg.split_file}: expected an official split_0.csv or "
                                "split_1.csv")
    row_of = {name.strip(): r for r, name in enumerate(meta.column("filename"))}

    def rows(path):
        t = T.read_csv(path, ["filename"], dataset="Kvasir-Capsule split", delimiter=None)
        T.check_unique(t, "filename")
        out = []
        for r, name in enumerate(t.column("filename")):
            if name.strip() not in row_of:
                raise T.DataFormatError(f"{t.where(r)}: {name!r} is not in metadata.csv")
            out.append(row_of[name.strip()])
        return np.asarray(out, np.int64)

    train_rows, test_rows = rows(cfg.split_file), rows(os.path.join(d, other))
    inner = T.group_split([videos[i] for i in train_rows], cfg.val_fraction, 0.0)
    return Dataset({"train": src.subset(train_rows[inner["train"]]),
                    "val": src.subset(train_rows[inner["val"]]),
                    "test": src.subset(test_rows)}, info)
