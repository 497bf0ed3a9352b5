"""grain input pipelines: training streams, exact-once evaluation, semi-supervised and continual.

Sample order is global: epoch e visits `permutation(seed, e)` of the source, trimmed to whole
global batches (the remainder is dropped per epoch). Process p of P takes positions p, p+P, ...
of that order, so the P local batches of a step are exactly the single-process global batch, the
shards are disjoint and complete, and a sample's augmentation depends only on (seed, position):
results do not change with the number of hosts or workers. Decode + resize + augment run in
grain worker processes (`num_workers`); batches are numpy dicts of uint8 images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np

from jaxmed.data import augment
from jaxmed.data.images import ImageError, decode_image

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """record -> batch element: decode, resize to `size`, augment, attach `valid`.

    on_error: 'raise' (default: the error names the file) or 'skip' (the element is kept with
    valid=0, so losses and metrics ignore it, and the file is logged)."""

    size: int | None
    channels: int
    chain: str = ""
    seed: int = 0
    on_error: str = "raise"
    steps: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):  # parse the chain once (and fail early on an unknown op)
        object.__setattr__(self, "steps", augment.parse_steps(self.chain))

    def __call__(self, position: int, record: dict, valid: bool = True) -> dict:
        steps = self.steps
        name = record["image"] if isinstance(record["image"], str) else f"record {record['index']}"
        hw = None if self.size is None else (self.size, self.size)
        # A chain that starts with a random resized crop crops the full (draft-decoded) image
        # and resizes once, as torchvision does, instead of resizing twice.
        crop_first = bool(steps) and steps[0][0] == "rrc" and "mask" not in record and hw
        try:
            image = decode_image(record["image"], size=None if crop_first else hw,
                                 at_least=hw if crop_first else None, channels=self.channels,
                                 name=name)
            mask = None
            if "mask" in record:
                mask = decode_image(record["mask"], size=image.shape[:2], channels=1, nearest=True,
                                    name=str(record["mask"]) if isinstance(record["mask"], str)
                                    else f"mask of record {record['index']}")
        except ImageError as e:
            if self.on_error != "skip":
                raise
            log.warning("skipping bad image (on_error='skip'): %s", e)
            c = self.channels
            image = np.zeros((self.size or 1, self.size or 1, c), np.uint8)
            mask = None if "mask" not in record else np.zeros(image.shape[:2] + (1,), np.uint8)
            valid = False
        if steps:
            rng = np.random.default_rng([self.seed, 7, int(position)])
            if mask is not None:  # geometric ops move image and mask together
                other = [n for n, _ in steps if n not in augment.GEOMETRIC]
                if other:
                    raise ValueError(f"augmentation {other} would alter segmentation masks; "
                                     f"records with masks take only {augment.GEOMETRIC}")
                both = augment.apply_steps(steps, np.concatenate([image, mask], -1), rng)
                image, mask = both[..., :-1], both[..., -1:]
            elif crop_first:
                image = augment.random_resized_crop(image, rng, *steps[0][1], out_hw=hw)
                image = augment.apply_steps(steps[1:], image, rng)
            else:
                image = augment.apply_steps(steps, image, rng)
        out = {"image": np.ascontiguousarray(image), "label": record["label"],
               "attrs": dict(record.get("attrs", {})), "index": np.int32(record["index"]),
               "valid": np.bool_(valid)}
        if mask is not None:
            out["mask"] = np.ascontiguousarray(mask[..., 0])
        return out


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch (every stream of a seed draws the same one)."""
    return np.random.default_rng([seed, 3, epoch]).permutation(n)


class _EpochOrder:
    """Global position -> source index: a fresh permutation per epoch, whole batches only."""

    def __init__(self, n: int, per_epoch: int, seed: int, shuffle: bool):
        self.n, self.per_epoch, self.seed, self.shuffle = n, per_epoch, seed, shuffle
        self._cache: tuple[int, np.ndarray] | None = None

    def __call__(self, position: int) -> int:
        epoch, j = divmod(int(position), self.per_epoch)
        if not self.shuffle:
            return j
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return int(self._cache[1][j])


@dataclasses.dataclass
class _Load:
    source: Any
    order: _EpochOrder
    preprocess: Preprocess

    def __call__(self, position: int) -> dict:
        return self.preprocess(position, self.source[self.order(position)])


@dataclasses.dataclass
class _LoadPadded:
    source: Any
    preprocess: Preprocess

    def __call__(self, position: int) -> dict:
        n = len(self.source)
        return self.preprocess(position, self.source[int(position) % n], valid=position < n)


def process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not split over {process_count} "
                         "processes")
    return global_batch // process_count


@dataclasses.dataclass
class TrainStream:
    """A checkpointable iterator of host-local training batches."""

    dataset: Any  # grain IterDataset
    steps_per_epoch: int
    num_epochs: int
    iterator: Any = None

    def __post_init__(self):
        self.iterator = iter(self.dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self.iterator)


def _maybe_prefetch(ds, num_workers: int, read_threads: int = 0):
    """IterDataset with grain's read-ahead threads (`read_threads`, 0 = grain's default) and,
    with num_workers > 0, worker processes."""
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(
        4 * read_threads, 8)) if read_threads else None
    it = ds.to_iter_dataset(options) if options else ds.to_iter_dataset()
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # (notebooks, scripts) use their defaults
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def train_stream(source, *, global_batch: int, preprocess: Preprocess, seed: int,
                 num_epochs: int, shuffle: bool = True, num_workers: int = 0,
                 read_threads: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> TrainStream:
    """Shuffled, augmented training batches for `num_epochs` epochs (remainder dropped)."""
    p, count = process_layout(process_index, process_count)
    local = local_batch_size(global_batch, count)
    steps = len(source) // global_batch
    if steps == 0:
        raise ValueError(f"training set of {len(source)} samples is smaller than one global "
                         f"batch of {global_batch}")
    order = _EpochOrder(len(source), steps * global_batch, seed, shuffle)
    ds = grain.MapDataset.range(num_epochs * steps * global_batch)[p::count]
    ds = ds.map(_Load(source, order, preprocess)).batch(local, drop_remainder=True)
    return TrainStream(_maybe_prefetch(ds, num_workers, read_threads), steps, num_epochs)


def eval_dataset(source, *, global_batch: int, preprocess: Preprocess,
                 process_index: int | None = None, process_count: int | None = None):
    """Every sample exactly once: the last batch is padded and padding has valid=False."""
    p, count = process_layout(process_index, process_count)
    local = local_batch_size(global_batch, count)
    padded = math.ceil(len(source) / global_batch) * global_batch
    ds = grain.MapDataset.range(padded)[p::count]
    return ds.map(_LoadPadded(source, preprocess)).batch(local, drop_remainder=False)


def eval_batches(source, *, global_batch: int, preprocess: Preprocess, num_workers: int = 0,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[dict]:
    ds = eval_dataset(source, global_batch=global_batch, preprocess=preprocess,
                      process_index=process_index, process_count=process_count)
    return iter(_maybe_prefetch(ds, num_workers))


# ------------------------------------------------------------------ semi-supervised streams
@dataclasses.dataclass(frozen=True)
class TwoViews:
    """An unlabeled element: a weak and a strong view of the same image, and its index."""

    weak: Preprocess
    strong: Preprocess

    def __call__(self, position: int, record: dict) -> dict:
        w = self.weak(position, record)
        s = self.strong(position, record)
        return {"weak": w["image"], "strong": s["image"], "index": w["index"],
                "valid": w["valid"] & s["valid"]}


@dataclasses.dataclass
class _LoadViews:
    source: Any
    order: _EpochOrder
    views: TwoViews

    def __call__(self, position: int) -> dict:
        return self.views(position, self.source[self.order(position)])


def semi_supervised_stream(labeled, unlabeled, *, global_batch: int, mu: int,
                           labeled_preprocess: Preprocess, views: TwoViews, seed: int,
                           num_steps: int, num_workers: int = 0,
                           process_index: int | None = None,
                           process_count: int | None = None) -> TrainStream:
    """Zip a labeled stream (B per step) with an unlabeled one (mu * B per step, weak + strong
    views); each restarts with a fresh permutation whenever it runs out."""
    p, count = process_layout(process_index, process_count)
    local_batch_size(global_batch, count)  # checks divisibility
    streams = []
    for src, batch, load_cls, fn in ((labeled, global_batch, _Load, labeled_preprocess),
                                     (unlabeled, mu * global_batch, _LoadViews, views)):
        per_epoch = (len(src) // batch) * batch
        if per_epoch == 0:
            raise ValueError(f"a split of {len(src)} samples is smaller than one batch of {batch}")
        order = _EpochOrder(len(src), per_epoch, seed + len(streams), True)
        ds = grain.MapDataset.range(num_steps * batch)[p::count]
        streams.append(ds.map(load_cls(src, order, fn)).batch(batch // count,
                                                               drop_remainder=True))
    zipped = grain.MapDataset.range(num_steps).map(_Zip(streams[0], streams[1]))
    return TrainStream(_maybe_prefetch(zipped, num_workers), num_steps, 1)


@dataclasses.dataclass
class _Zip:
    labeled: Any
    unlabeled: Any

    def __call__(self, step: int) -> dict:
        return {"labeled": self.labeled[int(step)], "unlabeled": self.unlabeled[int(step)]}


# ------------------------------------------------------------ weighted (over)sampling stream
def weighted_epoch_order(n: int, per_epoch: int, seed: int, epoch: int,
                         weights: np.ndarray | None = None) -> np.ndarray:
    """Source indices of one epoch of a source of n samples (`per_epoch` of them).

    weights None: `train_stream`'s order (the epoch's permutation, trimmed to whole batches).
    Otherwise systematic resampling: sample i appears floor(e_i) or ceil(e_i) times, where
    e_i = per_epoch * w_i / sum(w) (the expected counts with the least variance, unlike
    independent draws), and the epoch is shuffled; the epoch's length does not change."""
    if weights is None:
        return epoch_permutation(n, seed, epoch)[:per_epoch]
    w = np.asarray(weights, np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"sampling weights must be {n} finite values >= 0, not all 0; got "
                         f"shape {w.shape}")
    rng = np.random.default_rng([seed, 8, epoch])
    cum = np.cumsum(w / w.sum() * per_epoch)
    picks = np.searchsorted(cum, rng.random() + np.arange(per_epoch), side="right")
    return rng.permutation(np.minimum(picks, n - 1))


@dataclasses.dataclass
class _LoadOrdered:
    source: Any
    order: np.ndarray  # this epoch's source indices
    offset: int  # global position of the epoch's first sample (augmentation seeds)
    preprocess: Preprocess

    def __call__(self, j: int) -> dict:
        j = int(j)
        return self.preprocess(self.offset + j, self.source[int(self.order[j])])


class WeightedSamplingIterator:
    """Training batches drawn by per-sample sampling weights that may change between epochs
    (`set_weights`: from the next epoch on), checkpointable through grain's orbax handler
    (`get_state` / `set_state`: epoch, step, the weights in force and any pending ones).

    With no weights it yields exactly `train_stream`'s batches. Each epoch is a grain dataset
    over that epoch's order (positions p, p+P, ... for process p of P, as `train_stream`), so
    decoding runs in grain workers when num_workers > 0. Weights are stored as float lists in
    the JSON state: meant for sets of up to ~1e5 samples (HTL: lambda on the hard ones)."""

    def __init__(self, source, *, global_batch: int, preprocess: Preprocess, seed: int,
                 num_epochs: int, weights=None, num_workers: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        self.p, self.count = process_layout(process_index, process_count)
        self.local = local_batch_size(global_batch, self.count)
        self.steps = len(source) // global_batch
        if self.steps == 0:
            raise ValueError(f"training set of {len(source)} samples is smaller than one global "
                             f"batch of {global_batch}")
        self.source, self.global_batch, self.preprocess = source, global_batch, preprocess
        self.seed, self.num_epochs, self.num_workers = seed, num_epochs, num_workers
        self.epoch, self.step = 0, 0
        self.weights = self._check(weights)
        self.pending = None
        self._inner = None

    def _check(self, weights):
        if weights is None:
            return None
        w = [float(x) for x in np.asarray(weights, np.float64).ravel()]
        if len(w) != len(self.source):
            raise ValueError(f"{len(w)} sampling weights for a source of {len(self.source)}")
        return w

    def set_weights(self, weights) -> None:
        """Weights (one per source position, None = uniform) for every epoch not yet begun."""
        self.pending = self._check(weights)
        if self.step == 0 and self._inner is None:  # the current epoch has not begun
            self.weights, self.pending = self.pending, None

    def _start_epoch(self):
        per_epoch = self.steps * self.global_batch
        order = weighted_epoch_order(len(self.source), per_epoch, self.seed, self.epoch,
                                     None if self.weights is None else np.asarray(self.weights))
        ds = grain.MapDataset.range(per_epoch)[self.p::self.count][self.step * self.local:]
        ds = ds.map(_LoadOrdered(self.source, order, self.epoch * per_epoch, self.preprocess))
        self._inner = iter(_maybe_prefetch(ds.batch(self.local, drop_remainder=True),
                                           self.num_workers))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step == self.steps:
            self.epoch, self.step, self._inner = self.epoch + 1, 0, None
            if self.pending is not None:
                self.weights, self.pending = self.pending, None
        if self.epoch >= self.num_epochs:
            raise StopIteration
        if self._inner is None:
            self._start_epoch()
        batch = next(self._inner)
        self.step += 1
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"epoch": self.epoch, "step": self.step, "weights": self.weights,
                           "pending": self.pending}).encode()

    def set_state(self, state: bytes) -> None:
        s = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.epoch, self.step = int(s["epoch"]), int(s["step"])
        self.weights, self.pending = s["weights"], s["pending"]
        self._inner = None

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after restoring
        pass


def weighted_train_stream(source, *, global_batch: int, preprocess: Preprocess, seed: int,
                          num_epochs: int, weights=None, num_workers: int = 0,
                          process_index: int | None = None, process_count: int | None = None
                          ) -> TrainStream:
    """A `TrainStream` whose sampling weights can change between epochs
    (`stream.iterator.set_weights(w)`); see `WeightedSamplingIterator`."""
    it = WeightedSamplingIterator(source, global_batch=global_batch, preprocess=preprocess,
                                  seed=seed, num_epochs=num_epochs, weights=weights,
                                  num_workers=num_workers, process_index=process_index,
                                  process_count=process_count)
    return TrainStream(it, it.steps, num_epochs)
