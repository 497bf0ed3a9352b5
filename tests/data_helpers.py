"""Helpers for data tests: dataset folders laid out like the official downloads, with the
images the real metadata rows name generated on the fly (small, distinct, decodable)."""

from __future__ import annotations

import csv
import os
import shutil

import ml_collections
import numpy as np
from PIL import Image

from jaxmed import data as data_lib


def write_image(path: str, seed: int, size=(24, 20), mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8), "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def csv_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def head_file(src: str, dst: str, n: int) -> str:
    """The header and first n data lines of a CSV / list file."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src) as f, open(dst, "w") as g:
        for i, line in enumerate(f):
            if i > n:
                break
            g.write(line)
    return dst


def copy(src: str, dst: str) -> str:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(src, dst)
    return dst


def data_config(name: str, root: str, split_file: str = "", **kw) -> ml_collections.ConfigDict:
    cfg = data_lib.default_config()
    cfg.name, cfg.root, cfg.split_file = name, str(root), str(split_file)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def ham10000_folder(root: str, samples: str, *, real_jpeg_for: str | None = None) -> list[dict]:
    """HAM10000 layout: metadata CSV at the top, images split over two part folders."""
    rows = csv_rows(copy(os.path.join(samples, "HAM10000_metadata.csv"),
                         os.path.join(root, "HAM10000_metadata.csv")))
    for i, r in enumerate(rows):
        part = "HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2"
        path = os.path.join(root, part, r["image_id"] + ".jpg")
        if r["image_id"] == real_jpeg_for:
            copy(os.path.join(samples, "ISIC_0024310.jpg"), path)
        else:
            write_image(path, i)
    return rows
