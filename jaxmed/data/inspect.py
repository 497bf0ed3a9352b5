"""Check a dataset folder before training on it.

    python -m jaxmed.data.inspect --dataset ham10000 --root /data/HAM10000 [--split train]
        [--split-file F] [--val-fraction 0.1] [--test-fraction 0.2] [--num-classes N]

Prints one JSON object: num_records, class_counts {class: count} (positives per class for
multi-label data), attr_counts {attribute: {value: count}}, missing_files and bad_files (every
image is opened and decoded); exits 1 when either list is non-empty, 2 when the metadata itself
is unreadable (the message names the file and the columns or line at fault) or a class of
val / test is absent from train (`--num-classes N`, as config.data.num_classes, accepts it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from jaxmed import data as data_lib
from jaxmed.data.images import verify_image
from jaxmed.data.sources import TableSource, source_attrs, source_labels


def inspect(cfg, split: str = "all") -> dict:
    ds = data_lib.build(cfg, check_files=False)
    names = list(ds.splits) if split == "all" else [split]
    class_counts: Counter = Counter()
    attr_counts: dict[str, Counter] = {}
    missing, bad, n = [], [], 0
    checked: set[str] = set()
    for s in names:
        source = ds[s]
        n += len(source)
        labels = source_labels(source)
        if labels.ndim == 2:
            for c, k in zip(ds.info.class_names, labels.sum(0)):
                class_counts[c] += int(k)
        else:
            counts = np.bincount(labels, minlength=ds.info.num_classes)
            for c, k in zip(ds.info.class_names, counts):
                class_counts[c] += int(k)
        for a, values in source_attrs(source).items():
            attr_counts.setdefault(a, Counter()).update(str(int(v)) for v in values)
        if isinstance(source, TableSource):
            for path in source.files + (source.mask_files or []):
                if path in checked:
                    continue
                checked.add(path)
                problem = verify_image(path)
                if problem == "missing":
                    missing.append(path)
                elif problem:
                    bad.append(path)
    return {"dataset": cfg.name, "split": split, "num_records": n,
            "class_counts": dict(class_counts),
            "attr_counts": {a: dict(sorted(c.items())) for a, c in attr_counts.items()},
            "missing_files": sorted(missing), "bad_files": sorted(bad)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="all", help="train / val / test, or all (default)")
    p.add_argument("--split-file", default="")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--num-classes", type=int, default=0,
                   help="the class count, as config.data.num_classes (0: from the data)")
    a = p.parse_args(argv)
    cfg = data_lib.default_config()
    cfg.name, cfg.root, cfg.split_file = a.dataset, a.root, a.split_file
    cfg.val_fraction, cfg.test_fraction = a.val_fraction, a.test_fraction
    cfg.num_classes = a.num_classes
    try:
        report = inspect(cfg, a.split)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 1 if report["missing_files"] or report["bad_files"] else 0


if __name__ == "__main__":
    sys.exit(main())
