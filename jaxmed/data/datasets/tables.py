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

from jaxmed.config_check import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DataFormatError(ValueError, UserError):
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


def read_csv(path: str, required: Sequence[str], *, dataset: str,
             delimiter: str | None = ",") -> Table:
    """Read a CSV and check that every required column is there (names compared loosely).
    `delimiter=None`: ';' if the header line has one (e.g. Kvasir-Capsule's metadata), else ','.
    A BOM at the start is dropped and every cell is stripped of surrounding whitespace
    ('ISIC_1 , 1' names the image 'ISIC_1'), so ids and file names match the disk."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: metadata file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        if delimiter is None:
            delimiter = ";" if ";" in f.readline() else ","
            f.seek(0)
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [c.strip() for c in next(reader)]
        except StopIteration:
            raise DataFormatError(f"{path}: empty file, expected a CSV with columns "
                                  f"{list(required)}") from None
        rows = [[c.strip() for c in r] for r in reader if any(c.strip() for c in r)]
    table = Table(path, header, rows)
    missing = [c for c in required if not table.has(c)]
    if missing:
        raise DataFormatError(
            f"{path}: {dataset} expects columns {list(required)}; missing {missing}; the file "
            f"has {header}")
    return table


def read_split_list(path: str, *, dataset: str, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Whitespace split lists: 'image.jpg 1 0 0 0 0 0 0' (one-hot after the name); an image
    listed twice fails naming both lines. A BOM at the start of the file is dropped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: split list not found: {path}")
    names, labels, seen = [], [], {}
    with open(path, encoding="utf-8-sig") as f:
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
            stem = os.path.splitext(os.path.basename(parts[0]))[0]
            if stem in seen:
                raise DataFormatError(f"{path}: image {parts[0]!r} is listed on lines "
                                      f"{seen[stem]} and {lineno}; remove the repeat")
            seen[stem] = lineno
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
class ImageIndex(dict):
    """{file stem: path} for every image under a root, from one directory walk.

    A stem found at several places (a stray copy beside the real image, `x.jpg` and `x.png`)
    is kept in `ambiguous` with every path: `locate` refuses to pick one for an id that a table
    names. Stems no table names may be duplicated freely."""

    def __init__(self, root: str):
        super().__init__()
        self.root = root
        self.ambiguous: dict[str, list[str]] = {}

    def path(self, image_id: str, default_ext: str = ".jpg") -> str:
        """The one file for an image id ('ISIC_1', 'ISIC_1.jpg'); the path it should have under
        root when the disk lacks it (then reported missing)."""
        stem, ext = os.path.splitext(os.path.basename(image_id))
        if stem in self.ambiguous:
            paths = self.ambiguous[stem]
            if ext:
                same_ext = [p for p in paths if p.lower().endswith(ext.lower())]
                paths = same_ext or paths
            if len(paths) > 1:
                raise DataFormatError(
                    f"image {image_id!r} is found at {len(paths)} places under {self.root}: "
                    f"{paths}; keep one copy (jaxmed never picks one silently)")
            return paths[0]
        return self.get(stem) or os.path.join(self.root, stem + (ext or default_ext))


def index_images(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ImageIndex:
    """Every image under root (searched recursively), by file stem; see `ImageIndex`."""
    found = ImageIndex(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in extensions:
                continue
            path = os.path.join(dirpath, name)
            if stem in found:
                found.ambiguous.setdefault(stem, [found[stem]]).append(path)
            else:
                found[stem] = path
    return found


def find_file(root: str, *names: str) -> str:
    """The file below root named like one of `names` (glob patterns, tried in order); the path
    it should have under root when there is none (reported missing when read). Two matches of
    one pattern fail naming both: which metadata file is meant is not guessed."""
    for n in names:
        hits = sorted(glob.glob(os.path.join(root, "**", n), recursive=True))
        if len(hits) > 1:
            raise DataFormatError(f"{len(hits)} files named {n!r} under {root}: {hits}; keep "
                                  "one, or pass the one meant as config.data.split_file")
        if hits:
            return hits[0]
    return os.path.join(root, names[0])


def locate(ids: Sequence[str], index: dict[str, str], root: str, ext: str = ".jpg") -> list[str]:
    """Paths for image ids; an id not on disk gets the path it should have (reported missing),
    an id found at several places fails naming them (see `ImageIndex`)."""
    if not isinstance(index, ImageIndex):
        plain, index = index, ImageIndex(root)
        index.update(plain)
    return [index.path(i, ext) for i in ids]


def check_unique(table: Table, column: str, key=None) -> None:
    """Fail naming the file, the ids and their lines when an image appears on two rows: a
    repeated image would be counted twice, or land in two splits (test images in training).
    `key` maps a value to its identity (default: the file stem, so 'x' == 'x.jpg')."""
    key = key or (lambda v: os.path.splitext(os.path.basename(v.strip()))[0])
    lines: dict[str, list[int]] = {}
    for r, v in enumerate(table.column(column)):
        lines.setdefault(key(v), []).append(table.line(r))
    dups = {k: v for k, v in lines.items() if len(v) > 1}
    if dups:
        shown = "; ".join(f"{k!r} on lines {v}" for k, v in list(dups.items())[:5])
        raise DataFormatError(f"{table.path}: {len(dups)} image id(s) in column {column!r} "
                              f"appear on more than one row: {shown}; remove the repeats")


def inside_root(table: Table, column: str, root: str) -> list[str]:
    """Paths of a column relative to root, normalised; an absolute path or one that leaves root
    ('../x.jpg') fails naming its line, so a table never reads files outside the dataset."""
    out = []
    for r, v in enumerate(table.column(column)):
        rel = os.path.normpath(v.strip())
        if not v.strip() or os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            raise DataFormatError(f"{table.where(r)}: {column}={v!r} is not a path inside the "
                                  f"dataset root {root}")
        out.append(os.path.join(root, rel))
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
