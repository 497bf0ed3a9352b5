"""The labeled / unlabeled split of a semi-supervised run.

Either `config.ssl.num_labeled` images drawn from the train split with its class proportions
(at least one per class, seeded by `config.ssl.split_seed`: the same split for every method
and seed of a comparison), the rest of the train split unlabeled; or two split lists
(`config.ssl.labeled_list` / `unlabeled_list`, TEAR's `TrainN.txt` / `Train_unlN.txt`: an
image name then a one-hot label per line), whose images are found under `config.data.root`.

Records keep a stable `index` (the train record's, or for lists: the labeled list's rows
first, then the unlabeled list's), which indexes the per-sample memories; the unlabeled
set's true labels are kept for monitoring only (pseudo-label accuracy).

Refused in one line naming the key (`ConfigKeyError`, a `UserError`: the CLI prints it and
exits 2): a `num_labeled` that cannot give every class a label, fill a labeled batch and leave
an unlabeled one, lists too short for those batches, and a class with no labeled image (the
train split, or the labeled list, lacks it: nothing would teach that class).
"""

from __future__ import annotations

import os

import numpy as np

from jaxmed.config_check import ConfigKeyError
from jaxmed.data.datasets import tables as T
from jaxmed.data.sources import SubsetSource, TableSource, record_indices, source_labels


def check_num_labeled(num_labeled: int, counts, where: str = "the train split", *,
                      batch_size: int = 1, unlabeled_batch: int = 1,
                      include_labeled: bool = False) -> None:
    """`num_labeled` must give every class present in `counts` (images per class of the train
    split) one label and fill one labeled batch (`batch_size`), and leave one unlabeled image,
    and one unlabeled batch (`unlabeled_batch` = mu B) unless the unlabeled stream also draws
    the labeled images (`include_labeled`)."""
    counts = np.asarray(counts)
    n, present = int(counts.sum()), int((counts > 0).sum())
    low = max(present, batch_size)
    need = f"one labeled image per class ({present})"
    if batch_size > present:
        need = f"a labeled batch (config.train.batch_size={batch_size}) and {need}"
    high, left = n - 1, "one image left unlabeled"
    if unlabeled_batch > 1:
        batch = f"an unlabeled batch (config.ssl.mu x batch_size = {unlabeled_batch})"
        if not include_labeled:
            high, left = n - unlabeled_batch, f"{batch} left unlabeled"
        elif n < unlabeled_batch:
            high, left = -1, batch
    size = f"{where} has {n} images of {present} classes"
    if low > high:
        raise ConfigKeyError(f"config.ssl.num_labeled={num_labeled}: {size}, too few for "
                             f"{need}, and {left}")
    if not low <= num_labeled <= high:
        raise ConfigKeyError(f"config.ssl.num_labeled={num_labeled} is out of range: {size}; "
                             f"use [{low}, {high}]: {need}, and {left}")


def batches(config, unlabeled: bool = True) -> dict:
    """`check_num_labeled`'s batch arguments for a run of `config` (`unlabeled`: its algorithm
    draws unlabeled images, mu B a step)."""
    b, s = config.train.batch_size, config.ssl
    return dict(batch_size=b, unlabeled_batch=s.mu * b if unlabeled else 1,
                include_labeled=bool(s.get("include_labeled_in_unlabeled", False)))


def check_every_class(counts, class_names=None, *, key: str, where: str) -> None:
    """Every class has an image (`counts`: images per class), or fail naming those without."""
    counts = np.asarray(counts)
    missing = np.flatnonzero(counts == 0)
    if not missing.size:
        return
    named = class_names is not None
    shown = ", ".join(f"class {int(k)}" + (f" ({class_names[k]!r})" if named else "")
                      for k in missing[:8])
    raise ConfigKeyError(f"{key}: {where} has no image of {shown} ({missing.size} of "
                         f"{len(counts)} classes): a class without a labeled image is never "
                         "taught; give every class a labeled image")


def stratified_labeled(labels, num_labeled: int, seed: int) -> np.ndarray:
    """Sorted indices of `num_labeled` samples with the classes' proportions (largest
    remainders), at least one per present class."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("semi-supervised splits need single-label data")
    classes, counts = np.unique(labels, return_counts=True)
    check_num_labeled(num_labeled, counts)
    n = len(labels)
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


def from_num_labeled(train, num_labeled: int, seed: int, class_names=None, **batches):
    """(labeled, unlabeled) SubsetSources of the train split; a class of `class_names` (else
    up to the largest label) that the split lacks fails naming it, and so does a num_labeled
    out of range (`batches`: `check_num_labeled`'s batch_size, unlabeled_batch,
    include_labeled)."""
    labels = source_labels(train)
    if labels.ndim == 1 and labels.size:
        named = class_names is not None
        num_classes = len(class_names) if named else int(labels.max()) + 1
        counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
        check_every_class(counts, class_names, where="the train split",
                          key=f"config.ssl.num_labeled={num_labeled}")
        check_num_labeled(num_labeled, counts, **batches)
    keep = stratified_labeled(labels, num_labeled, seed)
    rest = np.setdiff1d(np.arange(len(labels)), keep)
    return SubsetSource(train, keep), SubsetSource(train, rest)


def _stems(files):
    return {os.path.splitext(os.path.basename(f))[0]: f for f in files}


def check_list_sizes(labeled_list: str, num_labeled: int, unlabeled_list: str,
                     num_unlabeled: int, *, batch_size: int = 1, unlabeled_batch: int = 1,
                     include_labeled: bool = False) -> None:
    """Split lists that fill a labeled batch and an unlabeled one (`check_num_labeled`'s
    batch arguments)."""
    if num_labeled < batch_size:
        raise ConfigKeyError(f"config.ssl.labeled_list={labeled_list!r} has {num_labeled} "
                             f"images, fewer than a batch (config.train.batch_size={batch_size})")
    if num_unlabeled == 0:
        raise ConfigKeyError(f"config.ssl.unlabeled_list={unlabeled_list!r} has no image")
    drawn = num_unlabeled + (num_labeled if include_labeled else 0)
    if drawn < unlabeled_batch:
        more = f" ({drawn} with the labeled ones)" if include_labeled else ""
        raise ConfigKeyError(f"config.ssl.unlabeled_list={unlabeled_list!r} has "
                             f"{num_unlabeled} images{more}, fewer than an unlabeled batch "
                             f"(config.ssl.mu x batch_size = {unlabeled_batch})")


def from_lists(labeled_list: str, unlabeled_list: str, root: str, num_classes: int,
               held_out: dict | None = None, class_names=None, **batches):
    """(labeled, unlabeled) TableSources from two split lists; images located under root.
    An image in both lists, or in a held-out split (val / test), fails naming it; so does a
    class the labeled list lacks (named by `class_names` when given), and a list too short
    for a batch (`batches`: `check_num_labeled`'s batch arguments)."""
    names_l, labels_l = T.read_split_list(labeled_list, dataset="semi-supervised labeled list",
                                          num_classes=num_classes)
    check_every_class(np.bincount(labels_l, minlength=num_classes), class_names,
                      where="the labeled list", key=f"config.ssl.labeled_list={labeled_list!r}")
    names_u, labels_u = T.read_split_list(unlabeled_list,
                                          dataset="semi-supervised unlabeled list",
                                          num_classes=num_classes)
    check_list_sizes(labeled_list, len(names_l), unlabeled_list, len(names_u), **batches)
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
