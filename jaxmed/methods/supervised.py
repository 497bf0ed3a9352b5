"""Supervised single-label and multi-label training and evaluation: a thin method on the kit
(`jaxmed.train`). Label type, channels, image size and class count follow the data.

`config.supervised.seeds` () is one run of `config.seed` in the workdir; a tuple of seeds makes
it a comparison on the engine every method uses (`train.comparison`): one run per seed in
`runs/supervised/seed_<s>/` (on the seed axis where the backend gains from it,
`config.supervised.parallel_seeds`) and `report/comparison.csv` with the mean and `_std` of
every test metric. One workdir holds one layout: switching between the two is refused.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from jaxmed import data as data_lib
from jaxmed.pruning import training as pruning_training
from jaxmed.train import comparison, sharding
from jaxmed.train import seeds as train_seeds
from jaxmed.train import workdir as workdir_lib
from jaxmed.train.run import build_run, fit
from jaxmed.train.workdir import write_config

log = logging.getLogger(__name__)
SECTION = "supervised"
HARMLESS_KEYS: tuple[str, ...] = comparison.harmless_keys(SECTION)


def base_config() -> ml_collections.ConfigDict:
    """The keys every method's training reads (the other methods' configs start from this)."""
    c = ml_collections.ConfigDict()
    c.method = "supervised"
    c.seed = 0
    c.data = data_lib.default_config()
    c.model = ml_collections.ConfigDict(dict(
        name="resnet18",
        stem="imagenet",  # ImageNet ResNets: 'imagenet' or 'small' (3x3/1 stem, 28-64 px)
        width=0,  # ResNets: first-stage width; 0 = the architecture's default
        dtype="float32",  # compute dtype ('bfloat16' on GPU / TPU); params stay float32
        pretrained="",  # a PyTorch .pth/.pt (torchvision layout) or a jaxmed workdir
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, eval_batch_size=128, epochs=10, steps=0,
        optimizer="adam",  # 'adam' (L2 as torch.optim.Adam), 'adamw', 'sgd'
        lr=1e-3, schedule="constant",  # 'constant', 'cosine'
        warmup_steps=0, weight_decay=0.0, momentum=0.9, nesterov=False,
        grad_clip_norm=0.0,
        loss="ce",  # ce, bce (multi-label), balanced_softmax, focal, ldam, gce
        label_smoothing=0.0,
        freeze_bn_after_epoch=0,  # > 0: BN in eval mode (running stats) from this epoch on
        log_every=50, eval_every=0, checkpoint_every=0, keep_checkpoints=3,
        early_stop_metric="", early_stop_mode="min", patience=0, progress=True,
    ))
    c.pruning = pruning_training.default_config()  # criterion 'none': dense training
    return c


def default_config() -> ml_collections.ConfigDict:
    """Every key the supervised trainer reads: `base_config` and its seeds."""
    c = base_config()
    c.supervised = ml_collections.ConfigDict(dict(
        methods=(SECTION,),  # the comparison engine's key: the one method
        # (): one run of config.seed in the workdir; (s1, s2, ...): one run per seed in
        # runs/supervised/seed_<s>/ and report/comparison.csv (mean and _std of each metric)
        seeds=(),
        parallel_seeds=True,  # the seeds as one program (jaxmed.train.seeds) where it gains
    ))
    return c


def check_config(config) -> None:
    """The seeds' keys here; the others are checked by their readers (the data / model /
    optimizer builders name the key at fault)."""
    s = config.get(SECTION)
    if s is not None and tuple(s.seeds):
        comparison.check_methods_and_seeds(s.methods, s.seeds, (SECTION,), SECTION)


def train_and_evaluate(config, workdir: str, hooks=()) -> dict:
    """Train, select on validation (if configured), evaluate on test; returns test metrics
    (with `supervised.seeds`: every seed's, their means and `_std` as 'supervised/<metric>')."""
    check_config(config)
    seeds = tuple(config.supervised.seeds) if SECTION in config else ()
    _check_layout(config, workdir, bool(seeds))
    if seeds:
        if hooks:
            raise ValueError("hooks observe one run: not with config.supervised.seeds")
        return _compare(config, workdir)
    write_config(config, workdir, harmless=HARMLESS_KEYS)
    _, final = fit(build_run(config), workdir, hooks=hooks)
    log.info("test metrics: %s", final)
    return as_result(final)


def as_result(final: dict) -> dict:
    """A run's final-split metrics as its result: 'test/<metric>'."""
    return {f"test/{k}": v for k, v in final.items()}


def fit_group(configs, seeds, workdirs, group_dir: str, *, what: str, ds=None,
              mesh=None) -> list[dict]:
    """The supervised runs of `configs` (one per seed, the same data) trained together on the
    seed axis where they stack (`train.seeds.fit_each`, stacked checkpoints in `group_dir`),
    else one after another; each run's `as_result`."""
    ds = ds or data_lib.build(configs[0].data)
    mesh = mesh or sharding.make_mesh()
    runs = [build_run(c, s, ds=ds, mesh=mesh) for c, s in zip(configs, seeds)]
    fitted = train_seeds.fit_each(runs, workdirs, group_dir, what=what)
    return [as_result(final) for _, final in fitted]


def _check_layout(config, workdir: str, per_seed: bool) -> None:
    """A workdir holding one run is not turned into a comparison of seeds, nor back (read from
    what is on disk, so no accepted config change gets past it)."""
    has_seeds = os.path.isdir(os.path.join(workdir, "runs", SECTION))
    has_one = any(os.path.exists(os.path.join(workdir, f))
                  for f in ("checkpoints", "metrics.jsonl", "result.json"))
    if (per_seed and has_one) or (not per_seed and has_seeds):
        layouts = {True: "a comparison of seeds (runs/supervised/seed_<s>/)",
                   False: "one run (config.supervised.seeds=())"}
        raise workdir_lib.ConfigChangedError(
            f"{workdir} holds {layouts[has_seeds]}; config.supervised.seeds="
            f"{tuple(config.supervised.seeds)!r} asks for {layouts[per_seed]}: use a new "
            "--workdir")


def _compare(config, workdir: str) -> dict:
    ds = data_lib.build(config.data)  # one dataset for every seed
    mesh = sharding.make_mesh()

    def run_one(method, seed, run_workdir, sub_config) -> dict:
        del method
        return as_result(fit(build_run(sub_config, seed, ds=ds, mesh=mesh), run_workdir)[1])

    def run_group(method, seeds, run_workdirs, sub_configs, group_dir) -> list[dict]:
        return fit_group(sub_configs, seeds, run_workdirs, group_dir, what=method, ds=ds,
                         mesh=mesh)

    def report(results) -> dict:
        metrics = sorted({k for runs in results.values() for r in runs for k in r
                          if k.startswith("test/")})
        summary = comparison.write_comparison(
            os.path.join(workdir, "report", "comparison.csv"), results, metrics)
        row = summary[SECTION]
        log.info("supervised over seeds %s: %s", tuple(config.supervised.seeds),
                 {m: f"{row[m]:.4f} +- {row[m + '_std']:.4f}" for m in metrics})
        return {f"{SECTION}/{k}": v for k, v in row.items()}

    write_config(config, workdir, harmless=HARMLESS_KEYS)
    return comparison.compare(workdir, config, SECTION, run_one, report, harmless=HARMLESS_KEYS,
                              run_group=run_group)


__all__ = ["HARMLESS_KEYS", "base_config", "build_run", "check_config", "default_config",
           "as_result", "fit_group", "train_and_evaluate"]
