"""PruneCXR (Holste et al., MICCAI 2023): how unstructured pruning affects long-tailed
multi-label chest X-ray classifiers, as one command.

Stages (`config.stages`, each skipped when its outputs are already in the workdir; stages.py):
  train    N runs (seeds) of the multi-label supervised model -> workdir/runs/run_XX/
           (or existing models from `config.prunecxr.checkpoints`: jaxmed workdirs or
           PyTorch .pt/.pth ResNet-50 state_dicts, converted)
  sweep    per run and prune type ('l1': global L1 magnitude over every conv and linear weight,
           classifier and downsample convs included; 'random'), test-set probabilities at every
           sparsity without fine-tuning -> workdir/sweep/run_XX_<type>.npy [sparsity, image,
           class]; masks for all levels from one radix pass; the levels of a chunk run in one
           compiled program (lax.map, or vmap: `prunecxr.level_axis`) over test batches
           sharded across every device of every process
  analyze  per-class AP / AUC / F1, forgettability curves, correlations with log frequency,
           class-pair distances, PIEs -> workdir/report/ (CSV, PNG, summary.md; report.py)

Decisions where the paper / reference leave room (see also analysis.py):
  - BatchNorm trains normally; the reference's quirk (BN frozen in eval mode after the first
    validation pass) is `config.train.freeze_bn_after_epoch = 1`.
  - Random pruning draws one score per weight per run, so a run's random masks are nested
    across sparsities (the reference draws independently per level).
  - Co-occurrence uses the standard IoU (images with both / images with either).
  - Classes that never lose 20% of their AP are reported as 'none' and left out of that
    correlation; the PIE ensemble uses L1-pruned predictions.
  - Several hosts: every host trains and sweeps each run together (data parallel); the lead
    host writes the sweep files and the report.
"""

from __future__ import annotations

import logging
import math
import numbers

import ml_collections

from jaxmed import data as data_lib
from jaxmed.methods import supervised
from jaxmed.methods.prunecxr import report, stages
from jaxmed.pruning.sweep import PRUNE_TYPES
from jaxmed.stacking import check_axis
from jaxmed.train import sharding
from jaxmed.train import workdir as workdir_lib

log = logging.getLogger(__name__)

STAGES = ("train", "sweep", "analyze")
# Keys that choose what runs or how the report reads the sweeps, never what a run or a sweep
# file holds: they may change when a study's workdir is resumed (e.g. stages=('analyze',)).
HARMLESS_KEYS = ("stages", "prunecxr.num_runs", "prunecxr.parallel_seeds", "prunecxr.chunk",
                 "prunecxr.level_axis",
                 "prunecxr.sweep_batch_size", "prunecxr.drop_threshold",
                 "prunecxr.change_level", "prunecxr.pie_level", "prunecxr.pie_fraction",
                 "prunecxr.pie_grid")
DEFAULT_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))


def default_config() -> ml_collections.ConfigDict:
    c = supervised.base_config()
    c.method = "prunecxr"
    c.stages = STAGES
    c.prunecxr = ml_collections.ConfigDict(dict(
        num_runs=30,
        parallel_seeds=True,  # the runs trained together as one program (jaxmed.train.seeds;
        # memory: every run's state and batch at once)
        checkpoints=(),  # existing models (jaxmed workdirs or .pt files) instead of training
        sparsities=DEFAULT_SPARSITIES,  # ascending, the first 0.0 (the dense model)
        prune_types=PRUNE_TYPES,
        chunk=10,  # sparsity levels per compiled forward (memory: chunk x params)
        level_axis="map",  # 'map' (levels one after another) or 'vmap' (grouped convs)
        sweep_batch_size=64,  # global; a multiple of the device count
        drop_threshold=0.2,  # "first sparsity with a 20% AP drop"
        change_level=0.95,  # "relative change at 95% sparsity"
        pie_level=0.9,
        pie_fraction=0.05,
        pie_grid=16,  # PIE images shown in report/pie_grid.png
    ))
    c.train.loss = "bce"
    return c


def check_config(config) -> None:
    """Fail before anything runs, naming the key: list-valued keys must be tuples of known
    entries, the sweep must start at the dense model, report levels must be swept."""
    def entries(key, value, known):
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise ValueError(f"config.{key}={value!r} must be a tuple, e.g. {known!r}")
        bad = [v for v in value if v not in known]
        if bad or not value:
            hint = (" (a tuple, not a comma-separated string: "
                    f"--config.{key}=\"{tuple(known)!r}\")" if any("," in str(v) for v in bad)
                    else "")
            raise ValueError(f"config.{key}={tuple(value)!r}: unknown or no entries {bad}; "
                             f"known: {list(known)}{hint}")

    entries("stages", config.stages, STAGES)
    pc = config.prunecxr
    entries("prunecxr.prune_types", pc.prune_types, PRUNE_TYPES)
    sp = pc.sparsities
    if (isinstance(sp, str) or not isinstance(sp, (tuple, list)) or not sp
            or not all(isinstance(s, numbers.Real) for s in sp)):
        raise ValueError(f"config.prunecxr.sparsities={sp!r} must be a tuple of numbers")
    if sp[0] != 0 or any(b <= a for a, b in zip(sp, sp[1:])) or sp[-1] >= 1:
        raise ValueError(f"config.prunecxr.sparsities={tuple(sp)!r} must start at 0.0 (the dense "
                         "model every change is relative to) and increase strictly below 1")
    for key in ("change_level", "pie_level"):
        if not any(math.isclose(s, pc[key], abs_tol=1e-6) for s in sp):
            raise ValueError(f"config.prunecxr.{key}={pc[key]} is not among "
                             f"config.prunecxr.sparsities")
    check_axis(pc.level_axis, "config.prunecxr.level_axis")
    if pc.chunk < 1:
        raise ValueError(f"config.prunecxr.chunk={pc.chunk} must be >= 1")
    if not pc.checkpoints and pc.num_runs < 1:
        raise ValueError(f"config.prunecxr.num_runs={pc.num_runs} must be >= 1")
    if isinstance(pc.checkpoints, str):
        raise ValueError(f"config.prunecxr.checkpoints={pc.checkpoints!r} must be a tuple of "
                         "paths")
    if not 0 < pc.pie_fraction <= 1:
        raise ValueError(f"config.prunecxr.pie_fraction={pc.pie_fraction} must be in (0, 1]")


def train_and_evaluate(config, workdir: str) -> dict:
    """Run the configured stages; returns the report's headline figures (lead process)."""
    check_config(config)
    workdir_lib.write_config(config, workdir, harmless=HARMLESS_KEYS)
    ds = data_lib.build(config.data)
    if not ds.info.multi_label:
        log.warning("PruneCXR is a multi-label study; %s is single-label (softmax, one-vs-rest "
                    "metrics)", ds.info.name)
    models = stages.list_models(config, workdir)
    if "train" in config.stages:
        models = stages.train_runs(config, workdir)
    if "sweep" in config.stages:
        stages.run_sweeps(config, workdir, ds, models)
    if "analyze" in config.stages and sharding.is_lead_process():
        return report.write_report(config, workdir, ds, stages.load_sweeps(workdir))
    return {}


__all__ = ["HARMLESS_KEYS", "STAGES", "check_config", "default_config", "train_and_evaluate"]
