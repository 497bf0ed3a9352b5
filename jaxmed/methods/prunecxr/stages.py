"""PruneCXR's stages and the files between them; each stage skips what the workdir already holds.

  train    workdir/runs/run_XX/ (a supervised run each, seed = config.seed + XX) + result.json
           (the kit's finished-run marker, written atomically)
  sweep    workdir/sweep/run_XX_<type>.npy [sparsity, image, class] float32 probabilities,
           labels.npy / index.npy [image] and sweep.json (sparsities, models, prune types,
           class names, training class counts); images are in stable-index order
  analyze  workdir/report/ (report.py)

Several processes: every process trains every run together and sweeps every run together (the
test batches are sharded over all devices of all processes); only the lead process writes.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
from typing import Callable, Iterable

import jax
import ml_collections
import numpy as np

from jaxmed import data as data_lib
from jaxmed.data.pipeline import Preprocess, eval_batches
from jaxmed.methods import supervised
from jaxmed.models.convert import load_torch_checkpoint
from jaxmed.pruning.sweep import make_forward, scores_for, sweep
from jaxmed.train import build, comparison, sharding
from jaxmed.train import seeds as train_seeds
from jaxmed.train.evaluate import predict
from jaxmed.train.workdir import write_config

log = logging.getLogger(__name__)

SWEEP_CACHE_BYTES = 8 * 2**30  # decoded test images kept in host memory (per process)


# ------------------------------------------------------------------------------ train
def run_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, "runs", f"run_{r:02d}")


def list_models(config, workdir: str) -> list[str]:
    """The configured existing models (`config.prunecxr.checkpoints`), else this workdir's
    finished runs."""
    paths = list(config.prunecxr.checkpoints)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"config.prunecxr.checkpoints: {missing[:3]} do not exist")
    if paths:
        return paths
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(
        workdir, "runs", "run_*", comparison.RESULT)))


def train_runs(config, workdir: str) -> list[str]:
    """Train the runs that have no result.json yet (with `prunecxr.parallel_seeds`, together
    as one program: `train.seeds`; each keeps its own workdir); returns every run's
    directory."""
    if config.prunecxr.checkpoints:
        log.info("using %d existing checkpoints; no training", len(config.prunecxr.checkpoints))
        return list_models(config, workdir)
    n = config.prunecxr.num_runs
    dirs = [run_dir(workdir, r) for r in range(n)]
    todo = [r for r in range(n) if comparison.read_result(dirs[r]) is None]
    cfgs = [run_config(config, config.seed + r) for r in todo]
    reason = train_seeds.backend_reason(config.prunecxr.parallel_seeds, len(todo))
    if todo and not reason:
        log.info("PruneCXR: training runs %s of %d together", [r + 1 for r in todo], n)
        group = os.path.join(workdir, "runs", "seeds_" + "-".join(str(c.seed) for c in cfgs))
        comparison.supersede_if_changed(workdir, cfgs[0], group, ())
        write_config(cfgs[0], group)  # the first run's; its name lists the others' seeds
        for c, r in zip(cfgs, todo):
            write_config(c, dirs[r])
        results = supervised.fit_group(cfgs, [c.seed for c in cfgs], [dirs[r] for r in todo],
                                       group, what="PruneCXR training runs")
        for c, r, result in zip(cfgs, todo, results):
            comparison.write_result(dirs[r], {"seed": c.seed, **result})
        return dirs
    if len(todo) > 1 and config.prunecxr.parallel_seeds:
        train_seeds.say_sequential("PruneCXR training runs", len(todo), reason)
    for c, r in zip(cfgs, todo):  # each built, trained and finished in turn
        log.info("PruneCXR: training run %d / %d in %s", r + 1, n, dirs[r])
        result = supervised.train_and_evaluate(c, dirs[r])
        comparison.write_result(dirs[r], {"seed": c.seed, **result})
    return dirs


def run_config(config, seed: int) -> ml_collections.ConfigDict:
    """A run's own config: a plain supervised one (the study's data / model / train / pruning
    keys, its seed), so that changing a PruneCXR-only key never touches the runs' workdirs."""
    keys = supervised.base_config().keys()
    c = ml_collections.ConfigDict({k: copy.deepcopy(config[k]) for k in keys})
    c.method, c.seed = "supervised", seed
    c.lock()
    return c


def load_model_variables(path: str, model, arch: str, image_shape) -> dict:
    """{'params', 'batch_stats'} (numpy): a jaxmed run's best (else latest) checkpoint, or a
    PyTorch state_dict (.pt/.pth) converted onto the model's structure."""
    if os.path.isdir(path):
        return build.load_workdir_variables(path)
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          np.zeros((1, *image_shape), np.float32))
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
    return load_torch_checkpoint(path, arch, target=target)


# ------------------------------------------------------------------------------ sweep
def sweep_path(workdir: str, r: int, kind: str) -> str:
    return os.path.join(workdir, "sweep", f"run_{r:02d}_{kind}.npy")


def cached_batches(source, *, batch_size: int, preprocess: Preprocess,
                   num_workers: int) -> Callable[[], Iterable[dict]]:
    """() -> this process's test batches. Every run x prune type x chunk of levels reads the
    whole test set: it is decoded once and kept in host memory when it fits."""
    def stream():
        return eval_batches(source, global_batch=batch_size, preprocess=preprocess,
                            num_workers=num_workers)

    size = preprocess.size or 0
    if len(source) // jax.process_count() * size * size * preprocess.channels \
            <= SWEEP_CACHE_BYTES:
        cached = list(stream())
        return lambda: cached
    log.info("test set larger than %d bytes decoded: decoding it on every sweep pass",
             SWEEP_CACHE_BYTES)
    return stream


def sweep_model(forward: Callable, variables: dict, scores, sparsities,
                batches: Callable[[], Iterable[dict]], mesh, *, chunk: int) -> np.ndarray:
    """Probabilities [len(sparsities), N, C] of one model over every test image (stable-index
    order). `variables` and `scores` are replicated on `mesh`; each chunk's stacked masked
    params too; every batch is sharded over the mesh's devices (`evaluate.predict`) and a
    chunk's predictions are fetched once."""
    def levels(fn):
        return predict(lambda b: {"probs": fn(b["image"])}, batches(), mesh,
                       sample_axis=1)["probs"]

    return sweep(forward, variables, scores, list(sparsities), levels, chunk=chunk)


def sweep_labels(batches: Callable[[], Iterable[dict]], mesh) -> dict:
    """{'index', 'label'} of every test image, in the order `sweep_model` returns them."""
    rows = ({k: b[k] for k in ("index", "label", "valid")} for b in batches())
    return predict(lambda b: {"valid": b["valid"]}, rows, mesh, keys=("index", "label"))


def run_sweeps(config, workdir: str, ds, models: list[str]) -> None:
    if not models:
        raise FileNotFoundError(f"no trained runs under {workdir}/runs and no "
                                "config.prunecxr.checkpoints: run the train stage first")
    pc = config.prunecxr
    mesh = sharding.make_mesh()
    if pc.sweep_batch_size <= 0 or pc.sweep_batch_size % mesh.devices.size:
        raise ValueError(f"config.prunecxr.sweep_batch_size={pc.sweep_batch_size}: the global "
                         f"batch must be a positive multiple of the {mesh.devices.size} devices")
    info = ds.info
    size = data_lib.image_size(config.data, info)
    channels = data_lib.image_channels(config.data, info)
    model = build.build_model(config.model, info.num_classes)
    forward = make_forward(model, multi_label=info.multi_label,
                           compute_dtype=np.dtype(config.model.dtype),
                           level_axis=pc.level_axis, mesh=mesh)
    batches = cached_batches(
        ds["test"], batch_size=pc.sweep_batch_size, num_workers=config.data.num_workers,
        preprocess=Preprocess(size, channels, "", config.seed, config.data.on_error))
    # Decided before anything of this stage is written, identically on every process.
    todo = [(r, kind) for r in range(len(models)) for kind in pc.prune_types
            if not os.path.exists(sweep_path(workdir, r, kind))]
    rows = sweep_labels(batches, mesh)
    lead = sharding.is_lead_process()
    if lead:
        os.makedirs(os.path.join(workdir, "sweep"), exist_ok=True)
        np.save(os.path.join(workdir, "sweep", "labels.npy"), rows["label"])
        np.save(os.path.join(workdir, "sweep", "index.npy"), rows["index"])
        write_json(os.path.join(workdir, "sweep", "sweep.json"), {
            "sparsities": list(pc.sparsities), "models": models,
            "prune_types": list(pc.prune_types), "class_names": info.class_names,
            "train_class_counts": np.asarray(info.class_counts).tolist()})
    chunk = min(pc.chunk, len(pc.sparsities))
    for r, path in enumerate(models):
        kinds = [kind for rr, kind in todo if rr == r]
        if not kinds:
            continue
        variables = sharding.replicate(
            load_model_variables(path, model, config.model.name, (size, size, channels)), mesh)
        for kind in kinds:
            # a replicated key: random scores land replicated like L1's (one mask program)
            rng = sharding.replicate(np.asarray(jax.random.PRNGKey(config.seed + 1000 + r)), mesh)
            scores = scores_for(kind, variables["params"], rng)
            preds = sweep_model(forward, variables, scores, pc.sparsities, batches, mesh,
                                chunk=chunk)
            if lead:
                save_atomic(sweep_path(workdir, r, kind), preds.astype(np.float32))
            log.info("swept run %d (%s): %s", r, kind, preds.shape)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("prunecxr sweep done")


def load_sweeps(workdir: str) -> dict:
    """{'meta', 'labels', 'index', kind: [R, S, N, C]} from the sweep stage's files."""
    d = os.path.join(workdir, "sweep")
    with open(os.path.join(d, "sweep.json")) as f:
        meta = json.load(f)
    out = {"meta": meta, "labels": np.load(os.path.join(d, "labels.npy")),
           "index": np.load(os.path.join(d, "index.npy"))}
    for kind in meta["prune_types"]:
        files = [sweep_path(workdir, r, kind) for r in range(len(meta["models"]))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"sweep predictions missing: {missing[:3]}; run the sweep "
                                    "stage")
        out[kind] = np.stack([np.load(f) for f in files])
    return out


# ------------------------------------------------------------------------------ files
def save_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)
