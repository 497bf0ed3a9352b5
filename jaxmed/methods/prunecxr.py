"""PruneCXR (Holste et al., MICCAI 2023): how unstructured pruning affects long-tailed
multi-label chest X-ray classifiers, as one command.

Stages (`config.stages`, each skipped when its outputs are already in the workdir):
  train    N runs (seeds) of the multi-label supervised model -> workdir/runs/run_XX/
           (or existing checkpoints from `config.prunecxr.checkpoints`: jaxmed workdirs or
           PyTorch .pt/.pth ResNet-50 state_dicts, converted)
  sweep    per run and prune type ('l1': global L1 magnitude over every conv and linear weight,
           classifier and downsample convs included; 'random'), test-set probabilities at every
           sparsity without fine-tuning -> workdir/sweep/run_XX_<type>.npy [sparsity, image,
           class]; masks for all levels from one radix pass; the levels of a chunk run in one
           compiled program (lax.map, or vmap: `prunecxr.level_axis`)
  analyze  per-class AP / AUC / F1, forgettability curves, correlations with log frequency,
           class-pair distances, PIEs -> workdir/report/ (CSV, PNG, summary.md)

Decisions where the paper / reference leave room (see also prunecxr_analysis.py):
  - BatchNorm trains normally; the reference's quirk (BN frozen in eval mode after the first
    validation pass) is `config.train.freeze_bn_after_epoch = 1`.
  - Random pruning draws one score per weight per run, so a run's random masks are nested
    across sparsities (the reference draws independently per level).
  - Co-occurrence uses the standard IoU (images with both / images with either).
  - Classes that never lose 20% of their AP are reported as 'none' and left out of that
    correlation; the PIE ensemble uses L1-pruned predictions.
  - Several hosts: every host trains each run together (data parallel); run r is swept by
    host r mod P; the lead host writes the report.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from jaxmed import data as data_lib
from jaxmed.data.pipeline import Preprocess, eval_batches
from jaxmed.methods import prunecxr_report, supervised
from jaxmed.models.convert import load_torch_checkpoint
from jaxmed.pruning import sweep as sweep_lib
from jaxmed.train import sharding
from jaxmed.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)

DEFAULT_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))
SWEEP_CACHE_BYTES = 8 * 2**30  # decoded test images kept in host memory for the sweeps


def default_config() -> ml_collections.ConfigDict:
    c = supervised.default_config()
    c.method = "prunecxr"
    c.stages = "train,sweep,analyze"
    c.prunecxr = ml_collections.ConfigDict(dict(
        num_runs=30,
        checkpoints="",  # comma-separated existing models (jaxmed workdirs or .pt files)
        sparsities=DEFAULT_SPARSITIES,
        prune_types="l1,random",
        chunk=10,  # sparsity levels per compiled forward (memory: chunk x params)
        level_axis="map",  # 'map' (levels one after another) or 'vmap' (grouped convs)
        sweep_batch_size=64,
        drop_threshold=0.2,  # "first sparsity with a 20% AP drop"
        change_level=0.95,  # "relative change at 95% sparsity"
        pie_level=0.9,
        pie_fraction=0.05,
        pie_grid=16,  # PIE images shown in report/pie_grid.png
    ))
    c.train.loss = "bce"
    return c


def paper_config(dataset: str) -> ml_collections.ConfigDict:
    """The paper's protocol on a CXR-LT label set: 30 runs of an ImageNet-stem ResNet-50 at
    256 px (bf16), batch 256, Adam 1e-4, BCE, at most 60 epochs with early stopping on
    validation loss (patience 15); then 20 sparsities x {L1, random}."""
    c = default_config()
    c.data.name = dataset
    c.data.image_size = 256
    c.data.channels = 3
    c.data.train_augment = "flip|rotate(15)"
    c.data.num_workers = 16
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.dtype = "bfloat16"
    c.train.optimizer = "adam"
    c.train.lr = 1e-4
    c.train.weight_decay = 0.0
    c.train.batch_size = 256
    c.train.eval_batch_size = 256
    c.train.epochs = 60
    c.train.early_stop_metric = "val/loss"
    c.train.patience = 15
    c.train.log_every = 50
    c.prunecxr.num_runs = 30
    c.prunecxr.chunk = 5
    c.prunecxr.sweep_batch_size = 64
    return c


def train_and_evaluate(config, workdir: str) -> dict:
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = set(stages) - {"train", "sweep", "analyze"}
    if unknown:
        raise ValueError(f"config.stages has unknown stage(s) {sorted(unknown)}; use train, "
                         "sweep, analyze")
    supervised.write_config(config, workdir)
    ds = data_lib.build(config.data)
    if not ds.info.multi_label:
        log.warning("PruneCXR is a multi-label study; %s is single-label (softmax, one-vs-rest "
                    "metrics)", ds.info.name)
    models = list_models(config, workdir)
    if "train" in stages:
        models = train_runs(config, workdir)
    if "sweep" in stages:
        run_sweeps(config, workdir, ds, models)
    result = {}
    if "analyze" in stages and sharding.is_lead_process():
        result = prunecxr_report.write_report(config, workdir, ds)
    return result


# ------------------------------------------------------------------------------ stage 1
def run_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, "runs", f"run_{r:02d}")


def list_models(config, workdir: str) -> list[str]:
    """Existing checkpoints from the config, else this workdir's finished runs."""
    if config.prunecxr.checkpoints:
        return [p.strip() for p in config.prunecxr.checkpoints.split(",") if p.strip()]
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(workdir, "runs", "run_*",
                                                                     "final.json")))


def train_runs(config, workdir: str) -> list[str]:
    if config.prunecxr.checkpoints:
        log.info("using %d existing checkpoints; no training", len(list_models(config, workdir)))
        return list_models(config, workdir)
    dirs = []
    for r in range(config.prunecxr.num_runs):
        d = run_dir(workdir, r)
        done = os.path.join(d, "final.json")
        if not os.path.exists(done):
            run_cfg = copy.deepcopy(config)
            run_cfg.unlock()
            run_cfg.seed = config.seed + r
            run_cfg.lock()
            log.info("PruneCXR: training run %d / %d in %s", r + 1, config.prunecxr.num_runs, d)
            result = supervised.train_and_evaluate(run_cfg, d)
            if sharding.is_lead_process():
                _write_json(done, {"seed": config.seed + r, **result})
        dirs.append(d)
    return dirs


def load_model_variables(path: str, model, arch: str, image_shape) -> dict:
    """A run's best (else latest) checkpoint, or a PyTorch state_dict (.pt/.pth) converted."""
    if os.path.isdir(path):
        for sub in ("checkpoints_best", "checkpoints"):
            d = os.path.join(path, sub)
            if os.path.isdir(d):
                ck = Checkpointer(d, keep=0)
                if ck.latest_step() is not None:
                    state, _ = ck.restore_raw()
                    ck.close()
                    return {"params": state["params"], "batch_stats": state["batch_stats"]}
        raise FileNotFoundError(f"no checkpoint under {path}")
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          np.zeros((1, *image_shape), np.float32))
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
    return load_torch_checkpoint(path, arch, target=target)


# ------------------------------------------------------------------------------ stage 2
def sweep_path(workdir: str, r: int, kind: str) -> str:
    return os.path.join(workdir, "sweep", f"run_{r:02d}_{kind}.npy")


def run_sweeps(config, workdir: str, ds, models: list[str]) -> None:
    if not models:
        raise FileNotFoundError(f"no trained runs under {workdir}/runs and no "
                                "config.prunecxr.checkpoints: run the train stage first")
    pc = config.prunecxr
    info = ds.info
    size = data_lib.image_size(config.data, info)
    channels = data_lib.image_channels(config.data, info)
    model = supervised.build_model(config.model, info.num_classes)
    forward = sweep_lib.make_forward(model, multi_label=info.multi_label,
                                     compute_dtype=np.dtype(config.model.dtype),
                                     level_axis=pc.level_axis)
    pre = Preprocess(size, channels, "", config.seed, config.data.on_error)
    test = ds["test"]

    def stream():
        return eval_batches(test, global_batch=pc.sweep_batch_size, preprocess=pre,
                            num_workers=config.data.num_workers, process_index=0,
                            process_count=1)

    # Every run x prune type x chunk of levels reads the whole test set: decode it once when
    # it fits in host memory.
    if len(test) * size * size * channels <= SWEEP_CACHE_BYTES:
        cached = list(stream())
        batches = lambda: cached  # noqa: E731
    else:
        log.info("test set larger than %d bytes decoded: decoding it on every sweep pass",
                 SWEEP_CACHE_BYTES)
        batches = stream

    os.makedirs(os.path.join(workdir, "sweep"), exist_ok=True)
    if sharding.is_lead_process():
        labels, index = [], []
        for b in batches():
            keep = np.asarray(b["valid"], bool)
            labels.append(np.asarray(b["label"])[keep])
            index.append(np.asarray(b["index"])[keep])
        np.save(os.path.join(workdir, "sweep", "labels.npy"), np.concatenate(labels))
        np.save(os.path.join(workdir, "sweep", "index.npy"), np.concatenate(index))
        _write_json(os.path.join(workdir, "sweep", "sweep.json"), {
            "sparsities": list(pc.sparsities), "models": models,
            "prune_types": pc.prune_types.split(","), "class_names": info.class_names,
            "train_class_counts": np.asarray(info.class_counts).tolist()})
    kinds = [k.strip() for k in pc.prune_types.split(",") if k.strip()]
    for r, path in enumerate(models):
        if r % jax.process_count() != jax.process_index():
            continue
        todo = [k for k in kinds if not os.path.exists(sweep_path(workdir, r, k))]
        if not todo:
            continue
        variables = jax.device_put(load_model_variables(path, model, config.model.name,
                                                        (size, size, channels)))
        for kind in todo:
            scores = sweep_lib.scores_for(kind, variables["params"],
                                          jax.random.PRNGKey(config.seed + 1000 + r))
            preds = sweep_lib.sweep(forward, variables, scores, list(pc.sparsities), batches,
                                    chunk=min(pc.chunk, len(pc.sparsities)))
            _save_atomic(sweep_path(workdir, r, kind), preds.astype(np.float32))
            log.info("swept run %d (%s): %s", r, kind, preds.shape)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("prunecxr sweep done")


def load_sweeps(workdir: str) -> dict:
    """{'meta', 'labels', 'index', kind: [R, S, N, C]} from the sweep stage's files."""
    d = os.path.join(workdir, "sweep")
    meta = json.load(open(os.path.join(d, "sweep.json")))
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


# ------------------------------------------------------------------------------ helpers
def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)
