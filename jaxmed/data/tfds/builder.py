"""One TFDS builder, `jaxmed_dataset`, whose configs are jaxmed datasets (a name + optional
reference split): examples are the adapters' records with the image file's bytes verbatim
(JPEG stays JPEG, bit-exact), the label, attributes, stable index and (for segmentation) the
mask bytes. Features are `tfds.features.Tensor`s, so preparing needs no TensorFlow."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxmed import data as data_lib
from jaxmed.data.images import shrink_jpeg
from jaxmed.data.sources import DatasetInfo

VERSION = "1.0.0"


def _encode(image, max_side: int = 0) -> bytes:
    """File path -> its bytes as stored (or shrunk, see max_side); an array -> lossless PNG."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            data = f.read()
        return shrink_jpeg(data, max_side) if max_side else data
    arr = np.asarray(image)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(buf, "PNG")
    return buf.getvalue()


def config_name(cfg) -> str:
    stem = os.path.splitext(os.path.basename(cfg.split_file))[0] if cfg.split_file else ""
    return re.sub(r"[^a-zA-Z0-9_]", "_", f"{cfg.name}-{stem}" if stem else cfg.name).lower()


class JaxmedDataset(tfds.core.GeneratorBasedBuilder):
    """A jaxmed dataset as ArrayRecord. Pass `data_config` (a `jaxmed.data.default_config()`
    with name / root / split_file) to prepare; reading needs only the prepared directory."""

    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the dataset from its official source and pass its folder as the manual dir "
        "(jaxmed's config.data.root); see jaxmed/data/datasets/ for the expected files.")

    def __init__(self, *, data_config, max_side: int = 0, **kwargs):
        self._data_config = data_config
        self._max_side = max_side
        self._dataset = data_lib.build(data_config)
        name = config_name(data_config) + (f"-s{max_side}" if max_side else "")
        config = tfds.core.BuilderConfig(name=name, description=f"jaxmed {data_config.name}" + (
            f", JPEGs shrunk to shorter side {max_side}" if max_side else ", original bytes"))
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        info: DatasetInfo = self._dataset.info
        first = self._dataset["train"][0]
        label = (tfds.features.Tensor(shape=(info.num_classes,), dtype=np.float32)
                 if info.multi_label else tfds.features.Tensor(shape=(), dtype=np.int64))
        features = {
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": label,
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            "attrs": {k: tfds.features.Tensor(shape=(), dtype=np.int64) for k in first["attrs"]},
        }
        if "mask" in first:
            features["mask"] = tfds.features.Tensor(shape=(), dtype=np.object_)
        meta = {"class_names": info.class_names, "multi_label": info.multi_label,
                "channels": info.channels, "image_size": info.image_size or 0,
                "attr_names": list(first["attrs"]), "source": info.name}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     metadata=tfds.core.MetadataDict(jaxmed=json.dumps(meta)))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._dataset.splits}

    def _generate_examples(self, split):
        source = self._dataset[split]
        for i in range(len(source)):
            rec = source[i]
            ex = {"image": _encode(rec["image"], self._max_side), "label": rec["label"],
                  "index": int(rec["index"]),
                  "attrs": {k: int(v) for k, v in rec["attrs"].items()}}
            if "mask" in rec:
                ex["mask"] = _encode(rec["mask"])
            yield f"{split}-{i}", ex


def prepare(data_config, data_dir: str, max_side: int = 0) -> str:
    """Write the dataset as ArrayRecord under data_dir; returns the prepared directory.

    max_side=0 stores every image file's bytes verbatim; max_side=N re-encodes larger JPEGs at
    shorter side N (quality 95) for faster decoding in training."""
    builder = JaxmedDataset(data_config=data_config, max_side=max_side, data_dir=data_dir,
                            file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_config.root))
    return str(builder.data_dir)


class TfdsSource:
    """Random-access records of one split of a prepared directory (image = encoded bytes)."""

    def __init__(self, directory: str, split: str):
        self.directory, self.split = directory, split
        self._source = None
        builder = tfds.builder_from_directory(directory)
        self._len = builder.info.splits[split].num_examples

    def _open(self):
        if self._source is None:  # opened lazily: grain workers open their own readers
            self._source = tfds.builder_from_directory(self.directory).as_data_source()[self.split]
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        ex = self._open()[int(i)]
        rec = {"image": ex["image"], "label": ex["label"].astype(np.float32)
               if np.ndim(ex["label"]) else np.int32(ex["label"]),
               "attrs": {k: np.int32(v) for k, v in ex["attrs"].items()},
               "index": np.int32(ex["index"])}
        if "mask" in ex:
            rec["mask"] = ex["mask"]
        return rec

    def __getstate__(self):
        return {"directory": self.directory, "split": self.split, "_len": self._len,
                "_source": None}

    @property
    def labels(self) -> np.ndarray:
        src = self._open()
        return np.stack([np.asarray(src[i]["label"]) for i in range(len(self))])


@data_lib.register("tfds")
def tfds_dataset(cfg) -> data_lib.Dataset:
    """config.data.root = a directory written by `prepare` (…/jaxmed_dataset/<config>/1.0.0)."""
    if not os.path.isfile(os.path.join(cfg.root, "dataset_info.json")):
        raise FileNotFoundError(f"tfds: {cfg.root} is not a prepared TFDS directory (no "
                                "dataset_info.json); write one with python -m jaxmed.data.tfds")
    builder = tfds.builder_from_directory(cfg.root)
    meta = json.loads(builder.info.metadata["jaxmed"])
    splits = {s: TfdsSource(cfg.root, s) for s in builder.info.splits}
    info = DatasetInfo(f"tfds:{meta['source']}", meta["class_names"], meta["multi_label"],
                       meta["channels"], meta["image_size"] or None, meta["attr_names"])
    return data_lib.Dataset(splits, info)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write a jaxmed dataset as TFDS ArrayRecord files.")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--split-file", default="")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--max-side", type=int, default=0,
                   help="re-encode JPEGs larger than this shorter side (0: keep the bytes)")
    a = p.parse_args(argv)
    cfg = data_lib.default_config()
    cfg.name, cfg.root, cfg.split_file = a.dataset, a.root, a.split_file
    print(prepare(cfg, a.data_dir, a.max_side))


