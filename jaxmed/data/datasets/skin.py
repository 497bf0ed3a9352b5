"""Dermatology datasets: HAM10000, ISIC 2018 task 3 (+ TEAR split lists), ISIC 2018 task 1
(segmentation), ISIC 2019 (+ FoPro-KD split CSVs), ISIC 2020 (+ BiasPruner's age splits),
Fitzpatrick17k (+ BiasPruner's skin-tone splits).

Each reads the files exactly as the official download ships them under `config.data.root`
(images found by id anywhere below it); `config.data.split_file` selects a reference split.
"""

from __future__ import annotations

import os
import re

import numpy as np

from jaxmed.data import Dataset, register
from jaxmed.data.datasets import tables as T
from jaxmed.data.sources import DatasetInfo, TableSource

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ISIC2018_CLASSES = ["AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"]
TEAR_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]  # the split lists' column order
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]  # UNK has no images
FOPRO_CLASSES = ["NV", "MEL", "BCC", "BKL", "AK", "SCC", "VASC", "DF"]  # `finding`, by frequency
FITZ_THREE = ["non-neoplastic", "benign", "malignant"]


def _group_splits(cfg, groups, source: TableSource) -> dict[str, TableSource]:
    """Train / val / test of a dataset without an official split, group-wise and stable."""
    parts = T.group_split(groups, cfg.val_fraction, cfg.test_fraction)
    return {k: source.subset(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------ HAM10000
@register("ham10000")
def ham10000(cfg) -> Dataset:
    """HAM10000: `HAM10000_metadata.csv` + images in one or two folders (part_1 / part_2).
    No official split: a lesion-wise split (all images of a lesion in one split)."""
    meta = cfg.split_file or T.find_file(cfg.root, "HAM10000_metadata.csv", "HAM10000_metadata")
    t = T.read_csv(meta, ["lesion_id", "image_id", "dx", "age", "sex"], dataset="HAM10000")
    T.check_unique(t, "image_id")
    labels = T.categorical(t, "dx", HAM_CLASSES)
    attrs = {"sex": T.sex_codes(t.column("sex")), "age_group": T.age_groups(t.column("age"))}
    files = T.locate(t.column("image_id"), T.index_images(cfg.root), cfg.root)
    src = TableSource(files, labels, attrs)
    info = DatasetInfo("ham10000", HAM_CLASSES, False, 3, attr_names=list(attrs))
    return Dataset(_group_splits(cfg, t.column("lesion_id"), src), info)


# ------------------------------------------------------------------------ ISIC 2018 task 3
@register("isic2018")
def isic2018(cfg) -> Dataset:
    """ISIC 2018 task 3. split_file: a TEAR split list (`TrainN.txt`: train = that list,
    val = `Val.txt`, test = `Test.txt` beside it; classes in the lists' order MEL, NV, BCC,
    AKIEC, BKL, DF, VASC), or a ground-truth CSV. Without one: the official training /
    validation / test ground-truth CSVs found under root (a split of training if absent)."""
    index = T.index_images(cfg.root)
    if cfg.split_file and not cfg.split_file.endswith(".csv"):
        d = os.path.dirname(cfg.split_file)
        lists = {"train": cfg.split_file, "val": os.path.join(d, "Val.txt"),
                 "test": os.path.join(d, "Test.txt")}
        splits = {}
        for split, path in lists.items():
            names, labels = T.read_split_list(path, dataset="ISIC 2018 (TEAR list)",
                                              num_classes=len(TEAR_CLASSES))
            splits[split] = TableSource(T.locate(names, index, cfg.root), labels)
        return Dataset(splits, DatasetInfo("isic2018", TEAR_CLASSES, False, 3))

    def read(path):
        t = T.read_csv(path, ["image", *ISIC2018_CLASSES], dataset="ISIC 2018 task 3")
        T.check_unique(t, "image")
        return TableSource(T.locate(t.column("image"), index, cfg.root),
                           T.onehot_labels(t, ISIC2018_CLASSES))

    train = read(cfg.split_file or T.find_file(cfg.root, "ISIC2018_Task3_Training_GroundTruth.csv"))
    val_csv = T.find_file(cfg.root, "ISIC2018_Task3_Validation_GroundTruth.csv")
    test_csv = T.find_file(cfg.root, "ISIC2018_Task3_Test_GroundTruth.csv")
    if os.path.isfile(val_csv) and os.path.isfile(test_csv) and not cfg.split_file:
        splits = {"train": train, "val": read(val_csv), "test": read(test_csv)}
    else:
        splits = _group_splits(cfg, [os.path.basename(f) for f in train.files], train)
    return Dataset(splits, DatasetInfo("isic2018", ISIC2018_CLASSES, False, 3))


# ------------------------------------------------------------------------ ISIC 2018 task 1
@register("isic2018_seg")
def isic2018_seg(cfg) -> Dataset:
    """ISIC 2018 task 1: `ISIC_xxx.jpg` inputs and `ISIC_xxx_segmentation.png` masks under root
    (1-channel masks, or RGB copies). Label 1 = the mask holds lesion pixels."""
    index = T.index_images(cfg.root)
    ids = sorted(k for k in index if not k.endswith("_segmentation") and
                 f"{k}_segmentation" in index)
    if not ids:
        raise FileNotFoundError(f"isic2018_seg: no image with an _segmentation.png mask under "
                                f"{cfg.root}")
    src = TableSource([index.path(i) for i in ids], np.ones(len(ids), np.int64),
                      mask_files=[index.path(f"{i}_segmentation") for i in ids])
    info = DatasetInfo("isic2018_seg", ["lesion"], False, 3)
    return Dataset(_group_splits(cfg, ids, src), info)


# ------------------------------------------------------------------------------ ISIC 2019
@register("isic2019")
def isic2019(cfg) -> Dataset:
    """ISIC 2019: `ISIC_2019_Training_GroundTruth.csv` (+ `ISIC_2019_Training_Metadata.csv`
    for sex / age, when present). split_file: a FoPro-KD `train_skin{fold}_{imb}.csv` (val /
    test CSVs beside it; label = `finding`, 0 NV ... 7 DF), else a lesion-wise split."""
    index = T.index_images(cfg.root)
    meta_csv = T.find_file(cfg.root, "ISIC_2019_Training_Metadata.csv")
    meta = {}
    if os.path.isfile(meta_csv):
        m = T.read_csv(meta_csv, ["image", "age_approx", "sex"], dataset="ISIC 2019 metadata")
        for img, age, sex in zip(m.column("image"), m.column("age_approx"), m.column("sex")):
            meta[img] = (age, sex)

    def attrs_for(images):
        ages = [meta.get(i, ("", ""))[0] for i in images]
        sexes = [meta.get(i, ("", ""))[1] for i in images]
        return {"sex": T.sex_codes(sexes), "age_group": T.age_groups(ages)}

    if cfg.split_file:
        splits = {}
        for split in ("train", "val", "test"):
            path = T.sibling(cfg.split_file, "train_", f"{split}_")
            t = T.read_csv(path, ["image", "finding"], dataset="ISIC 2019 (FoPro-KD split)")
            T.check_unique(t, "image")
            labels = T.categorical(t, "finding", [str(i) for i in range(len(FOPRO_CLASSES))])
            images = t.column("image")
            splits[split] = TableSource(T.locate(images, index, cfg.root), labels,
                                        attrs_for(images))
        return Dataset(splits, DatasetInfo("isic2019", FOPRO_CLASSES, False, 3,
                                           attr_names=["sex", "age_group"]))
    gt = T.find_file(cfg.root, "ISIC_2019_Training_GroundTruth.csv")
    t = T.read_csv(gt, ["image", *ISIC2019_CLASSES, "UNK"], dataset="ISIC 2019")
    T.check_unique(t, "image")
    labels = T.onehot_labels(t, ISIC2019_CLASSES + ["UNK"])
    if (labels == len(ISIC2019_CLASSES)).any():
        r = int(np.flatnonzero(labels == len(ISIC2019_CLASSES))[0])
        raise T.DataFormatError(f"{t.where(r)}: UNK has no images in the official training set")
    images = t.column("image")
    src = TableSource(T.locate(images, index, cfg.root), labels, attrs_for(images))
    info = DatasetInfo("isic2019", ISIC2019_CLASSES, False, 3, attr_names=["sex", "age_group"])
    return Dataset(_group_splits(cfg, images, src), info)


# ------------------------------------------------------------------------------ ISIC 2020
def biased_split_files(train_file: str) -> dict[str, str]:
    """BiasPruner's split layout: `<p>biased_train_set_split.csv` -> `<p>biased_val_set_split.csv`
    and the unbiased test set (`<p>unbiased_test_set.csv`, with 'total' dropped for flipped)."""
    d, name = os.path.split(train_file)
    if "train_set_split" not in name:
        raise T.DataFormatError(f"{train_file}: expected a '*_train_set_split.csv' file of the "
                                "BiasPruner splits")
    val = os.path.join(d, name.replace("train_set_split", "val_set_split"))
    stem = re.split(r"(?:un)?biased_train_set_split", name)[0]  # unbiased train: same test
    candidates = [stem + "unbiased_test_set.csv", stem.replace("total_", "") +
                  "unbiased_test_set.csv"]
    test = next((os.path.join(d, c) for c in candidates if os.path.isfile(os.path.join(d, c))),
                os.path.join(d, candidates[0]))
    return {"train": train_file, "val": val, "test": test}


@register("isic2020")
def isic2020(cfg) -> Dataset:
    """ISIC 2020 (benign / malignant). split_file: one of BiasPruner's `age_ISIC_2020` files
    (attribute `age_group` = the files' binary age bin); else the official ground truth
    `ISIC_2020_Training_GroundTruth.csv` split patient-wise (attribute = age group, sex)."""
    index = T.index_images(cfg.root)
    classes = ["benign", "malignant"]
    if cfg.split_file:
        splits = {}
        for split, path in biased_split_files(cfg.split_file).items():
            t = T.read_csv(path, ["image_name", "target", "sex"], dataset="ISIC 2020 (age split)")
            T.check_unique(t, "image_name")
            age_col = "age" if t.has("age") else "age_approx"
            if not t.has(age_col):
                raise T.DataFormatError(f"{path}: expected an 'age' or 'age_approx' column; the "
                                        f"file has {t.header}")
            ages = T.categorical(t, age_col, ["0", "1"])
            splits[split] = TableSource(T.locate(t.column("image_name"), index, cfg.root),
                                        T.categorical(t, "target", ["0", "1"]),
                                        {"age_group": ages, "sex": T.sex_codes(t.column("sex"))})
        return Dataset(splits, DatasetInfo("isic2020", classes, False, 3,
                                           attr_names=["age_group", "sex"]))
    gt = T.find_file(cfg.root, "ISIC_2020_Training_GroundTruth.csv")
    t = T.read_csv(gt, ["image_name", "patient_id", "sex", "age_approx", "target"],
                   dataset="ISIC 2020")
    T.check_unique(t, "image_name")
    src = TableSource(T.locate(t.column("image_name"), index, cfg.root),
                      T.categorical(t, "target", ["0", "1"]),
                      {"age_group": T.age_groups(t.column("age_approx")),
                       "sex": T.sex_codes(t.column("sex"))})
    info = DatasetInfo("isic2020", classes, False, 3, attr_names=["age_group", "sex"])
    return Dataset(_group_splits(cfg, t.column("patient_id"), src), info)


# ------------------------------------------------------------------------- Fitzpatrick17k
@register("fitzpatrick17k")
def fitzpatrick17k(cfg) -> Dataset:
    """Fitzpatrick17k: `fitzpatrick17k.csv`, images named `<md5hash>.jpg` under root.

    Without split_file: 3 classes (three_partition_label), attribute `skin_type` = the
    fitzpatrick_scale 1-6 (-1 unknown), a random split. With one of BiasPruner's `fitz/` split
    files: benign vs malignant, attribute `skin_group` = the files' binary `fitzpatrick` column.
    """
    index = T.index_images(cfg.root)
    if cfg.split_file:
        splits = {}
        for split, path in biased_split_files(cfg.split_file).items():
            t = T.read_csv(path, ["md5hash", "fitzpatrick", "three_partition_label"],
                           dataset="Fitzpatrick17k (BiasPruner split)")
            T.check_unique(t, "md5hash")
            splits[split] = TableSource(
                T.locate(t.column("md5hash"), index, cfg.root),
                T.categorical(t, "three_partition_label", ["benign", "malignant"]),
                {"skin_group": T.categorical(t, "fitzpatrick", ["0", "1"])})
        return Dataset(splits, DatasetInfo("fitzpatrick17k", ["benign", "malignant"], False, 3,
                                           attr_names=["skin_group"]))
    path = T.find_file(cfg.root, "fitzpatrick17k.csv")
    t = T.read_csv(path, ["md5hash", "fitzpatrick_scale", "three_partition_label"],
                   dataset="Fitzpatrick17k")
    T.check_unique(t, "md5hash")
    scale = np.asarray([int(v) if v.strip().lstrip("-").isdigit() else -1
                        for v in t.column("fitzpatrick_scale")], np.int64)
    bad = np.flatnonzero((scale < 1) & (scale != -1) | (scale > 6))
    if bad.size:
        raise T.DataFormatError(f"{t.where(int(bad[0]))}: fitzpatrick_scale must be 1-6 or -1")
    src = TableSource(T.locate(t.column("md5hash"), index, cfg.root),
                      T.categorical(t, "three_partition_label", FITZ_THREE),
                      {"skin_type": scale})
    info = DatasetInfo("fitzpatrick17k", FITZ_THREE, False, 3, attr_names=["skin_type"])
    return Dataset(_group_splits(cfg, t.column("md5hash"), src), info)
