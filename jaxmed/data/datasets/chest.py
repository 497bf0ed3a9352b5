"""Chest X-ray datasets: NIH ChestX-ray14 (+ NIH-CXR-LT labels, + BiasPruner's GbP splits) and
MIMIC-CXR-LT. Images are 1-channel; configs usually set `data.channels=3` for ImageNet models."""

from __future__ import annotations

import logging
import os

import numpy as np

from jaxmed.data import Dataset, register
from jaxmed.data.datasets import tables as T
from jaxmed.data.sources import DatasetInfo, TableSource

log = logging.getLogger(__name__)

NIH_CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
               "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
               "Pleural_Thickening", "Hernia"]
NIH_LT_CLASSES = ["No Finding", "Infiltration", "Effusion", "Atelectasis", "Nodule", "Mass",
                  "Consolidation", "Pneumothorax", "Pleural Thickening", "Cardiomegaly",
                  "Emphysema", "Edema", "Fibrosis", "Subcutaneous Emphysema", "Pneumonia",
                  "Tortuous Aorta", "Calcification of the Aorta", "Pneumoperitoneum", "Hernia",
                  "Pneumomediastinum"]
MIMIC_LT_CLASSES = ["Support Devices", "Lung Opacity", "Cardiomegaly", "Pleural Effusion",
                    "Atelectasis", "Pneumonia", "Edema", "No Finding",
                    "Enlarged Cardiomediastinum", "Consolidation", "Pneumothorax", "Fracture",
                    "Calcification of the Aorta", "Tortuous Aorta", "Subcutaneous Emphysema",
                    "Lung Lesion", "Pneumomediastinum", "Pneumoperitoneum", "Pleural Other"]
NIH_COLUMNS = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender"]


def nih_findings(table: T.Table, classes=NIH_CLASSES) -> np.ndarray:
    """'Cardiomegaly|Effusion' -> multi-hot over `classes`; 'No Finding' -> all zeros."""
    lookup = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(table), len(classes)), np.float32)
    for r, v in enumerate(table.column("Finding Labels")):
        for f in filter(None, (x.strip() for x in v.split("|"))):
            if f == "No Finding":
                continue
            if f not in lookup:
                raise T.DataFormatError(f"{table.where(r)}: unknown finding {f!r}; expected "
                                        f"{classes} or 'No Finding'")
            out[r, lookup[f]] = 1.0
    return out


def nih_attrs(table: T.Table) -> dict[str, np.ndarray]:
    attrs = {"sex": T.sex_codes(table.column("Patient Gender")),
             "age_group": T.age_groups(table.column("Patient Age"))}
    if table.has("View Position"):
        attrs["view"] = np.asarray([{"PA": 0, "AP": 1}.get(v.strip(), -1)
                                    for v in table.column("View Position")], np.int64)
    return attrs


def _read_list(path: str) -> set[str]:
    with open(path, encoding="utf-8-sig") as f:  # a BOM is not part of the first name
        return {line.strip() for line in f if line.strip()}


@register("nih_cxr14")
def nih_cxr14(cfg) -> Dataset:
    """NIH ChestX-ray14: `Data_Entry_2017.csv`, `train_val_list.txt` / `test_list.txt` (the
    official patient-wise test split), images in `images_*/images/`. Validation: a patient-wise
    share (`val_fraction`) of train_val. 14 findings, multi-label. split_file: one of
    BiasPruner's GbP files (see `nih_gbp`)."""
    if cfg.split_file:
        return nih_gbp(cfg)
    t = T.read_csv(T.find_file(cfg.root, "Data_Entry_2017.csv"), NIH_COLUMNS,
                   dataset="NIH ChestX-ray14")
    T.check_unique(t, "Image Index")
    images = t.column("Image Index")
    src = TableSource(T.locate(images, T.index_images(cfg.root), cfg.root, ".png"),
                      nih_findings(t), nih_attrs(t))
    patients = t.column("Patient ID")
    test_list = T.find_file(cfg.root, "test_list.txt")
    if os.path.isfile(test_list):
        test = _read_list(test_list)
        is_test = np.asarray([i in test for i in images])
        rest = np.flatnonzero(~is_test)
        parts = T.group_split([patients[i] for i in rest], cfg.val_fraction)
        splits = {"train": rest[parts["train"]], "val": rest[parts["val"]],
                  "test": np.flatnonzero(is_test)}
    else:
        log.warning("nih_cxr14: no test_list.txt under %s; splitting by patient", cfg.root)
        splits = T.group_split(patients, cfg.val_fraction, cfg.test_fraction)
    info = DatasetInfo("nih_cxr14", NIH_CLASSES, True, 1, attr_names=list(src.attrs))
    return Dataset({k: src.subset(v) for k, v in splits.items()}, info)


def nih_gbp(cfg) -> Dataset:
    """BiasPruner's NIH splits (`GbP/`). A `*_train_set_split.csv` file: No Finding (0) vs
    Pneumothorax (1), attribute sex, with its val / unbiased test files. `train.csv` /
    `train_dataset.csv`: the 14-class single-finding task; its train / val / test share
    patients, so they are pooled and re-split by patient (`val_fraction`, `test_fraction`)."""
    from jaxmed.data.datasets.skin import biased_split_files

    index = T.index_images(cfg.root)
    cols = ["Image Index", "Finding Labels", "Patient ID", "Patient Gender", "Patient Age"]
    name = os.path.basename(cfg.split_file)
    if "train_set_split" in name:
        classes = ["No Finding", "Pneumothorax"]
        splits = {}
        for split, path in biased_split_files(cfg.split_file).items():
            t = T.read_csv(path, cols, dataset="NIH (BiasPruner GbP split)")
            T.check_unique(t, "Image Index")
            splits[split] = TableSource(T.locate(t.column("Image Index"), index, cfg.root, ".png"),
                                        T.categorical(t, "Finding Labels", classes), nih_attrs(t))
        return Dataset(splits, DatasetInfo("nih_cxr14", classes, False, 1,
                                           attr_names=list(splits["train"].attrs)))
    tables = [T.read_csv(T.sibling(cfg.split_file, "train", s), cols, dataset="NIH (GbP)")
              for s in ("train", "val", "test")]
    classes = sorted({v for t in tables for v in t.column("Finding Labels")})
    files, labels, attrs, patients = [], [], [], []
    for t in tables:
        T.check_unique(t, "Image Index")
        files += T.locate(t.column("Image Index"), index, cfg.root, ".png")
        labels.append(T.categorical(t, "Finding Labels", classes))
        attrs.append(nih_attrs(t))
        patients += t.column("Patient ID")
    src = TableSource(files, np.concatenate(labels),
                      {k: np.concatenate([a[k] for a in attrs]) for k in attrs[0]})
    parts = T.group_split(patients, cfg.val_fraction, cfg.test_fraction)
    return Dataset({k: src.subset(v) for k, v in parts.items()},
                   DatasetInfo("nih_cxr14", classes, False, 1, attr_names=list(attrs[0])))


@register("nih_cxr_lt")
def nih_cxr_lt(cfg) -> Dataset:
    """NIH-CXR-LT (MICCAI 2023): `miccai2023_nih-cxr-lt_labels_{train,val,test}.csv` (columns
    `id` = image file, `subj_id`, one 0/1 column per class, 20 classes) found under root or
    beside `split_file`; images from the NIH download; sex / age from `Data_Entry_2017.csv` when
    present."""
    base = cfg.split_file or T.find_file(cfg.root, "miccai2023_nih-cxr-lt_labels_train.csv")
    index = T.index_images(cfg.root)
    entry = T.find_file(cfg.root, "Data_Entry_2017.csv")
    demo = {}
    if os.path.isfile(entry):
        e = T.read_csv(entry, NIH_COLUMNS, dataset="NIH ChestX-ray14")
        a = nih_attrs(e)
        demo = {img: {k: a[k][i] for k in a} for i, img in enumerate(e.column("Image Index"))}
    splits = {}
    for split in ("train", "val", "test"):
        t = T.read_csv(T.sibling(base, "_train", f"_{split}"), ["id", "subj_id", *NIH_LT_CLASSES],
                       dataset="NIH-CXR-LT")
        T.check_unique(t, "id")
        ids = t.column("id")
        attrs = {}
        if demo:
            keys = ("sex", "age_group", "view")
            attrs = {k: np.asarray([demo.get(i, {}).get(k, -1) for i in ids]) for k in keys}
        splits[split] = TableSource(T.locate(ids, index, cfg.root, ".png"),
                                    T.multihot_labels(t, NIH_LT_CLASSES), attrs)
    return Dataset(splits, DatasetInfo("nih_cxr_lt", NIH_LT_CLASSES, True, 1,
                                       attr_names=list(splits["train"].attrs)))


@register("mimic_cxr_lt")
def mimic_cxr_lt(cfg) -> Dataset:
    """MIMIC-CXR-LT (MICCAI 2023): `miccai2023_mimic-cxr-lt_labels_{train,val,test}.csv` with
    `path` relative to the MIMIC-CXR-JPG root (= config.data.root) and 19 class columns.
    A path that is absolute or leaves the root ('../x.jpg') fails naming its row."""
    base = cfg.split_file or T.find_file(cfg.root, "miccai2023_mimic-cxr-lt_labels_train.csv")
    splits = {}
    for split in ("train", "val", "test"):
        t = T.read_csv(T.sibling(base, "_train", f"_{split}"), ["path", *MIMIC_LT_CLASSES],
                       dataset="MIMIC-CXR-LT")
        T.check_unique(t, "path", key=lambda v: os.path.normpath(v.strip()))
        files = T.inside_root(t, "path", cfg.root)
        splits[split] = TableSource(files, T.multihot_labels(t, MIMIC_LT_CLASSES))
    return Dataset(splits, DatasetInfo("mimic_cxr_lt", MIMIC_LT_CLASSES, True, 1))


def read_nih_boxes(path: str) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """`BBox_List_2017.csv` -> {image: [(finding, x, y, w, h), ...]} in original pixels.

    Its header is odd: 'Bbox [x,y,w,h]' is one name over four value columns."""
    t = T.read_csv(path, ["Image Index", "Finding Label"], dataset="NIH ChestX-ray14 boxes")
    if len(t.header) < 6 or not T.norm(t.header[2]).startswith("bbox"):
        raise T.DataFormatError(f"{path}: expected 'Image Index, Finding Label, Bbox [x,y,w,h]' "
                                f"over 6 columns, found {t.header}")
    boxes: dict[str, list] = {}
    for r, row in enumerate(t.rows):
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            raise T.DataFormatError(f"{t.where(r)}: box values {row[2:6]} are not numbers"
                                    ) from None
        finding = row[1].strip()
        if finding not in NIH_CLASSES and finding.replace(" ", "_") not in NIH_CLASSES and \
                finding != "Infiltrate":
            raise T.DataFormatError(f"{t.where(r)}: unknown finding {finding!r}")
        boxes.setdefault(row[0].strip(), []).append((finding, x, y, w, h))
    return boxes
