"""Reading official metadata tables strictly: expected columns checked with the file named, rows
named by line number, images located by id under a root folder, group-wise (patient / lesion)
splits that are stable across machines."""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
import re
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DataFormatError(ValueError):
    """A metadata file that is not what the dataset's documentation says it is."""


def norm(name: str) -> str:
    """Column names compared without case, spaces or punctuation ('Patient ID' == 'PatientID')."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


class Table:
    """Rows of a CSV (or whitespace list) file with checked, normalised column names."""

    def __init__(self, path: str, header: list[str], rows: list[list[str]]):
        self.path, self.header, self.rows = path, header, rows
        self._index = {}
        for i, h in enumerate(header):
            self._index.setdefault(norm(h), i)

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, column: str) -> bool:
        return norm(column) in self._index

    def column(self, column: str) -> list[str]:
        i = self._index[norm(column)]
        return [r[i] if i < len(r) else "" for r in self.rows]

    def line(self, row: int) -> int:
        """1-based line number of a data row in the file (the header is line 1)."""
        return row + 2

    def where(self, row: int) -> str:
        return f"{self.path}, line {self.line(row)}"


def read_csv(path: str, required: Sequence[str], *, dataset: str) -> Table:
    """Read a CSV and check that every required column is there (names compared loosely)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: metadata file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(f"{path}: empty file, expected a CSV with columns "
                                  f"{list(required)}") from None
        rows = [r for r in reader if any(c.strip() for c in r)]
    table = Table(path, header, rows)
    missing = [c for c in required if not table.has(c)]
    if missing:
        raise DataFormatError(
            f"{path}: {dataset} expects columns {list(required)}; missing {missing}; the file "
            f"has {header}")
    return table


def read_split_list(path: str, *, dataset: str, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Whitespace split lists: 'image.jpg 1 0 0 0 0 0 0' (one-hot after the name)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: split list not found: {path}")
    names, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != num_classes + 1:
                raise DataFormatError(f"{path}, line {lineno}: expected an image name and "
                                      f"{num_classes} one-hot values, got {len(parts) - 1}")
            try:
                onehot = [int(float(p)) for p in parts[1:]]
            except ValueError:
                raise DataFormatError(f"{path}, line {lineno}: non-numeric label in {line!r}"
                                      ) from None
            if sum(onehot) != 1:
                raise DataFormatError(f"{path}, line {lineno}: label is not one-hot: {onehot}")
            names.append(parts[0])
            labels.append(int(np.argmax(onehot)))
    return names, np.asarray(labels, np.int64)


def onehot_labels(table: Table, classes: Sequence[str]) -> np.ndarray:
    """Integer labels from one 0/1 (or 0.0/1.0) column per class; rows must be one-hot."""
    cols = np.stack([_floats(table, c) for c in classes], axis=1)
    bad = np.flatnonzero(cols.sum(1) != 1)
    if bad.size:
        r = int(bad[0])
        raise DataFormatError(f"{table.where(r)}: label columns {list(classes)} are not one-hot: "
                              f"{cols[r].tolist()}")
    return cols.argmax(1).astype(np.int64)


def multihot_labels(table: Table, classes: Sequence[str]) -> np.ndarray:
    cols = np.stack([_floats(table, c) for c in classes], axis=1)
    bad = np.flatnonzero(~np.isin(cols, (0.0, 1.0)).all(1))
    if bad.size:
        r = int(bad[0])
        raise DataFormatError(f"{table.where(r)}: label columns must be 0/1, got "
                              f"{cols[r].tolist()}")
    return cols.astype(np.float32)


def _floats(table: Table, column: str) -> np.ndarray:
    out = []
    for r, v in enumerate(table.column(column)):
        try:
            out.append(float(v) if v.strip() else 0.0)
        except ValueError:
            raise DataFormatError(f"{table.where(r)}: column {column!r} holds {v!r}, expected a "
                                  "number") from None
    return np.asarray(out)


def categorical(table: Table, column: str, classes: Sequence[str]) -> np.ndarray:
    """Integer codes of a text column; a value outside `classes` names its line."""
    lookup = {c: i for i, c in enumerate(classes)}
    out = []
    for r, v in enumerate(table.column(column)):
        if v.strip() not in lookup:
            raise DataFormatError(f"{table.where(r)}: {column}={v!r} is not one of {list(classes)}")
        out.append(lookup[v.strip()])
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------- attributes
SEX = {"m": 0, "male": 0, "f": 1, "female": 1}


def sex_codes(values: Iterable[str]) -> np.ndarray:
    """male 0, female 1, anything else (unknown, empty) -1."""
    return np.asarray([SEX.get(v.strip().lower(), -1) for v in values], np.int64)


def parse_age(value: str) -> float:
    """'57', '57.0', '058Y' -> 57.0; empty / unknown -> nan."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[yY]?\s*", value or "")
    return float(m.group(1)) if m else float("nan")


AGE_BINS = (40.0, 60.0)  # age groups: < 40, 40-59, >= 60


def age_groups(values: Iterable[str]) -> np.ndarray:
    ages = np.asarray([parse_age(v) for v in values])
    groups = np.digitize(np.nan_to_num(ages, nan=-1.0), AGE_BINS)
    return np.where(np.isnan(ages), -1, groups).astype(np.int64)


# ---------------------------------------------------------------------------- image files
def index_images(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, str]:
    """{file stem: path} for every image under root (searched recursively, sorted, first wins)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions and stem not in found:
                found[stem] = os.path.join(dirpath, name)
    return found


def find_file(root: str, *names: str) -> str:
    """The first file below root named like one of `names` (glob patterns, tried in order);
    the path it should have under root when there is none (reported missing when read)."""
    for n in names:
        hits = sorted(glob.glob(os.path.join(root, "**", n), recursive=True))
        if hits:
            return hits[0]
    return os.path.join(root, names[0])


def locate(ids: Sequence[str], index: dict[str, str], root: str, ext: str = ".jpg") -> list[str]:
    """Paths for image ids; an id not on disk gets the path it should have (reported missing)."""
    out = []
    for i in ids:
        stem = os.path.splitext(os.path.basename(i))[0]
        out.append(index.get(stem) or os.path.join(root, stem + (os.path.splitext(i)[1] or ext)))
    return out


# --------------------------------------------------------------------------------- splits
def group_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a group id (patient, lesion)."""
    return int(hashlib.md5(key.encode()).hexdigest()[:12], 16) / 16**12


def group_split(groups: Sequence[str], val_fraction: float, test_fraction: float = 0.0
                ) -> dict[str, np.ndarray]:
    """Indices of train / val / test with every group (patient, lesion) in exactly one split."""
    u = np.asarray([group_fraction(str(g)) for g in groups])
    test = u < test_fraction
    val = ~test & (u < test_fraction + val_fraction)
    return {"train": np.flatnonzero(~test & ~val), "val": np.flatnonzero(val),
            "test": np.flatnonzero(test)}


def sibling(path: str, old: str, new: str) -> str:
    """The file beside `path` whose name has `old` replaced by `new`."""
    d, name = os.path.split(path)
    if old not in name:
        raise DataFormatError(f"{path}: expected {old!r} in the split file's name to find its "
                              f"{new!r} sibling")
    return os.path.join(d, name.replace(old, new))
