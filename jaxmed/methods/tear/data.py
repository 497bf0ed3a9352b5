"""The labeled / unlabeled split of a semi-supervised run.

Either `config.ssl.num_labeled` images drawn from the train split with its class proportions
(at least one per class, seeded by `config.ssl.split_seed`: the same split for every method
and seed of a comparison), the rest of the train split unlabeled; or two split lists
(`config.ssl.labeled_list` / `unlabeled_list`, TEAR's `TrainN.txt` / `Train_unlN.txt`: an
image name then a one-hot label per line), whose images are found under `config.data.root`.

Records keep a stable `index` (the train record's, or for lists: the labeled list's rows
first, then the unlabeled list's), which indexes the per-sample memories; the unlabeled
set's true labels are kept for monitoring only (pseudo-label accuracy).
"""

from __future__ import annotations

import os

import numpy as np

from jaxmed.data.datasets import tables as T
from jaxmed.data.sources import SubsetSource, TableSource, record_indices, source_labels


def stratified_labeled(labels, num_labeled: int, seed: int) -> np.ndarray:
    """Sorted indices of `num_labeled` samples with the classes' proportions (largest
    remainders), at least one per present class."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("semi-supervised splits need single-label data")
    classes, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    if not len(classes) <= num_labeled < n:
        raise ValueError(f"config.ssl.num_labeled={num_labeled} must be in [{len(classes)} "
                         f"(one per class), {n}) for a train split of {n}")
    exact = num_labeled * counts / n
    quota = np.maximum(np.floor(exact).astype(np.int64), 1)
    quota = np.minimum(quota, counts)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while quota.sum() < num_labeled:  # add to the largest remainders with room
        for k in order:
            if quota.sum() < num_labeled and quota[k] < counts[k]:
                quota[k] += 1
    while quota.sum() > num_labeled:  # the one-per-class floor overshot: trim the largest
        k = int(np.argmax(np.where(quota > 1, quota, -1)))
        quota[k] -= 1
    rng = np.random.default_rng([seed, 11])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def from_num_labeled(train, num_labeled: int, seed: int):
    """(labeled, unlabeled) SubsetSources of the train split."""
    labels = source_labels(train)
    keep = stratified_labeled(labels, num_labeled, seed)
    rest = np.setdiff1d(np.arange(len(labels)), keep)
    return SubsetSource(train, keep), SubsetSource(train, rest)


def _stems(files):
    return {os.path.splitext(os.path.basename(f))[0]: f for f in files}


def from_lists(labeled_list: str, unlabeled_list: str, root: str, num_classes: int,
               held_out: dict | None = None):
    """(labeled, unlabeled) TableSources from two split lists; images located under root.
    An image in both lists, or in a held-out split (val / test), fails naming it."""
    names_l, labels_l = T.read_split_list(labeled_list, dataset="semi-supervised labeled list",
                                          num_classes=num_classes)
    names_u, labels_u = T.read_split_list(unlabeled_list,
                                          dataset="semi-supervised unlabeled list",
                                          num_classes=num_classes)
    stem = lambda n: os.path.splitext(os.path.basename(n))[0]  # noqa: E731
    both = sorted(set(map(stem, names_l)) & set(map(stem, names_u)))
    if both:
        raise T.DataFormatError(f"{len(both)} image(s) are in both {labeled_list} and "
                                f"{unlabeled_list}, e.g. {both[:5]}")
    for split, source in (held_out or {}).items():
        if isinstance(source, TableSource):
            leak = sorted((set(map(stem, names_l)) | set(map(stem, names_u)))
                          & set(_stems(source.files)))
            if leak:
                raise T.DataFormatError(f"{len(leak)} image(s) of the split lists are also in "
                                        f"the {split} split, e.g. {leak[:5]}")
    index = T.index_images(root)
    nl = len(names_l)
    labeled = TableSource(T.locate(names_l, index, root), labels_l, ids=np.arange(nl))
    unlabeled = TableSource(T.locate(names_u, index, root), labels_u,
                            ids=nl + np.arange(len(names_u)))
    for name, src in (("labeled", labeled), ("unlabeled", unlabeled)):
        gone = src.missing_files()
        if gone:
            raise FileNotFoundError(f"{len(gone)} image(s) of the {name} list are not under "
                                    f"{root}, e.g. {gone[:5]}")
    return labeled, unlabeled


def labels_by_index(source, num_slots: int) -> np.ndarray:
    """(num_slots,) int32 true labels by stable index, -1 where none is known."""
    out = np.full((num_slots,), -1, np.int32)
    out[record_indices(source)] = np.asarray(source_labels(source), np.int32)
    return out
