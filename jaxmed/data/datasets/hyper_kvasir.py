"""Hyper-Kvasir labeled images (FoPro-KD's second dataset): 23 classes of GI endoscopy.

The official download `hyper-kvasir-labeled-images.zip` unpacks to
    labeled-images/{lower-gi-tract,upper-gi-tract}/<category>/<finding>/<uuid>.jpg
with `labeled-images/image-labels.csv` (columns `Video file` = the image's uuid, `Organ`,
`Finding`, `Classification` = the category). config.data.root: that folder (or any folder
above it). The CSV gives the labels; every labelled image must sit in its finding's folder
(a disagreement fails naming the file). Without the CSV, the folder names are the labels, and
a folder holding images that is not one of the 23 findings fails naming it (its images would
otherwise be dropped without a word).
No official train / val / test split is used (the paper's was not released): a stable
image-wise split by `val_fraction` / `test_fraction`.
"""

from __future__ import annotations

import os

from jaxmed.data import Dataset, register
from jaxmed.data.datasets import tables as T
from jaxmed.data.sources import DatasetInfo, TableSource

# The 23 findings, lower GI tract then upper GI tract, by category (the dataset paper's order).
CLASSES = [
    "cecum", "ileum", "retroflex-rectum",  # lower: anatomical landmarks
    "hemorrhoids", "polyps", "ulcerative-colitis-grade-0-1", "ulcerative-colitis-grade-1",
    "ulcerative-colitis-grade-1-2", "ulcerative-colitis-grade-2",
    "ulcerative-colitis-grade-2-3", "ulcerative-colitis-grade-3",  # lower: pathological
    "bbps-0-1", "bbps-2-3", "impacted-stool",  # lower: quality of mucosal views
    "dyed-lifted-polyps", "dyed-resection-margins",  # lower: therapeutic interventions
    "pylorus", "retroflex-stomach", "z-line",  # upper: anatomical landmarks
    "barretts", "barretts-short-segment", "esophagitis-a", "esophagitis-b-d",  # upper: path.
]


@register("hyper_kvasir")
def hyper_kvasir(cfg) -> Dataset:
    index = T.index_images(cfg.root)
    csv_path = cfg.split_file or T.find_file(cfg.root, "image-labels.csv")
    if os.path.isfile(csv_path):
        t = T.read_csv(csv_path, ["Video file", "Organ", "Finding", "Classification"],
                       dataset="Hyper-Kvasir labeled images")
        T.check_unique(t, "Video file")
        ids = [v.strip() for v in t.column("Video file")]
        labels = T.categorical(t, "Finding", CLASSES)
        files = T.locate(ids, index, cfg.root)
        for r, (f, y) in enumerate(zip(files, labels)):
            folder = os.path.basename(os.path.dirname(f))
            found = os.path.splitext(os.path.basename(ids[r]))[0] in index  # no disk check
            if found and folder in CLASSES and folder != CLASSES[y]:
                raise T.DataFormatError(f"{t.where(r)}: image {ids[r]!r} is labelled "
                                        f"{CLASSES[y]!r} but lies in the folder {folder!r} ({f})")
    else:
        ids, files, labels = [], [], []
        unknown: dict[str, int] = {}
        for stem in sorted(index):
            folder = os.path.basename(os.path.dirname(index.path(stem)))
            if folder in CLASSES:
                ids.append(stem)
                files.append(index.path(stem))
                labels.append(CLASSES.index(folder))
            else:
                where = os.path.dirname(index.path(stem))
                unknown[where] = unknown.get(where, 0) + 1
        if unknown:
            shown = "; ".join(f"{d} ({n} images)" for d, n in sorted(unknown.items())[:5])
            raise T.DataFormatError(
                f"hyper_kvasir: no image-labels.csv under {cfg.root}, so folder names are the "
                f"labels, but {sum(unknown.values())} images lie in {len(unknown)} folder(s) "
                f"that are not one of the 23 findings: {shown}; rename them to a finding "
                f"({CLASSES[:3]}...), move them out of the root, or give the CSV "
                "(config.data.split_file)")
        if not ids:
            raise FileNotFoundError(f"hyper_kvasir: neither image-labels.csv nor images in "
                                    f"finding folders ({CLASSES[:3]}...) under {cfg.root}")
    src = TableSource(files, labels)
    parts = T.group_split(ids, cfg.val_fraction, cfg.test_fraction)
    splits = {k: src.subset(v) for k, v in parts.items()}
    return Dataset(splits, DatasetInfo("hyper_kvasir", list(CLASSES), False, 3))
