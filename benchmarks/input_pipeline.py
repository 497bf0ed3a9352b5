"""Images/s of the host input pipeline: decode + random-resized-crop 224 + flip of the real
sample JPEG (../shared/samples/ISIC_0024310.jpg, 600x450), in grain worker processes.

    python benchmarks/input_pipeline.py --workers 1,2 --images 1500 \
        --out bench_out/input_pipeline.json

Each worker reads with one thread, so images/s per worker is images/s per core. The first rows
run in this process with one thread: full-size decode + resize, and draft-mode (reduced-scale
DCT) decode. Steady state: the first batches (worker start-up) are not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table, write_json  # noqa: E402
from jaxmed.data.pipeline import Preprocess, train_stream  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "samples", "ISIC_0024310.jpg")


class RepeatedFile:
    """A source of n records all naming the same JPEG (the OS page cache holds it)."""

    def __init__(self, path: str, n: int):
        self.path, self.n = path, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": self.path, "label": 0, "attrs": {}, "index": int(i)}


class FullDecode(Preprocess):
    """Baseline without draft decoding: decode at 600x450, then crop and resize."""

    def __call__(self, position, record, valid=True):
        import numpy as np
        from PIL import Image

        from jaxmed.data import augment
        img = np.asarray(Image.open(record["image"]).convert("RGB"))
        rng = np.random.default_rng([self.seed, 7, int(position)])
        img = augment.flip(augment.random_resized_crop(img, rng, 0.08, out_hw=(224, 224)), rng)
        return {"image": img, "label": record["label"], "attrs": {}, "index": record["index"],
                "valid": np.bool_(valid)}


def bench(path: str, workers: int, images: int, batch: int, draft: bool) -> dict:
    pre = Preprocess(224, 3, "rrc(0.08)|flip") if draft else FullDecode(224, 3)
    warm = 3
    stream = train_stream(RepeatedFile(path, images + (warm + 1) * batch), global_batch=batch,
                          preprocess=pre, seed=0, num_epochs=1, num_workers=workers,
                          read_threads=1, process_index=0, process_count=1)
    for _ in range(warm):  # worker start-up, first decodes
        next(stream)
    n, t0 = 0, time.perf_counter()
    while n < images:
        b = next(stream)
        n += len(b["image"])
    dt = time.perf_counter() - t0
    return {"workers": workers, "draft_decode": draft, "images": n,
            "images_per_s": n / dt, "images_per_s_per_worker": n / dt / max(workers, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2")
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image", default=SAMPLE)
    p.add_argument("--files", default="original,shrunk", help="which JPEGs: original, shrunk")
    p.add_argument("--out", default="bench_out/input_pipeline.json")
    a = p.parse_args()
    from jaxmed.data.images import shrink_jpeg

    small = os.path.join(os.path.dirname(os.path.abspath(a.out)), "sample_shrunk256.jpg")
    os.makedirs(os.path.dirname(small), exist_ok=True)
    with open(a.image, "rb") as f, open(small, "wb") as g:
        g.write(shrink_jpeg(f.read(), 256))
    rows = []
    files = {"original": ("original", a.image),
             "shrunk": ("shrunk to 256 (tfds --max-side 256)", small)}
    for label, path in (files[f] for f in a.files.split(",")):
        rows += [dict(file=label, **bench(path, 0, a.images // 2, a.batch, draft=False)),
                 dict(file=label, **bench(path, 0, a.images // 2, a.batch, draft=True))]
        for w in map(int, a.workers.split(",")):
            rows.append(dict(file=label, **bench(path, w, a.images, a.batch, draft=True)))
        print(rows, flush=True)
    print(f"\ninput pipeline on {os.cpu_count()} cores: decode + rrc 224 + flip of "
          f"{os.path.basename(a.image)}")
    print_table(rows, ["file", "workers", "draft_decode", "images", "images_per_s",
                       "images_per_s_per_worker"])
    write_json(a.out, {"cpu_count": os.cpu_count(), "image": a.image, "rows": rows})


if __name__ == "__main__":
    main()
