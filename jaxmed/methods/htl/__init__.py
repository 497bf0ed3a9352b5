"""Attend Who is Weak (Jaiswal et al., WACV 2023): pruning-identified hard-to-learn samples.

Every `htl.every_epochs` epochs the current model is pruned by global magnitude at
`htl.sparsities` without fine-tuning (masks only); samples on which the pruned copies disagree
with the dense model are the hard-to-learn (HTL) ones (`identify.py`, driven over the whole
training set by `driver.py`), and training attends to them until the next identification:
their loss weighs `htl.weight` times (`htl_weight`) or they are drawn `htl.weight` times as
often (`htl_oversample`, through the pipeline's sampling weights). Spec: shared/specs/htl.md.

`config.htl.task`:
  segmentation       U-Net (`unet_resnet*`) on image + mask data, Dice + BCE; IoU, Dice, ISIC
                     thresholded Jaccard; disagreement = IoU(dense, pruned) < iou_threshold
  classification     a classifier on image labels; AUC, balanced accuracy; disagreement = dense
                     top-1 vs the pruned majority
  weak_localization  classification training, then class activation maps thresholded into
                     masks and scored against the ground-truth masks (cam_iou, cam_dice, ...)
  semi_supervised    TEAR's semi-supervised step (`htl.ssl_algorithm`, e.g. 'fixmatch', with
                     the `config.ssl` block of jaxmed.methods.tear) on a labeled / unlabeled
                     split; the HTL set is among the UNLABELED samples (dense pseudo label vs
                     the pruned majority) and its weight goes to `state.ssl.weights`
                     (`semi.py`); AUC, balanced accuracy. 'htl_oversample' is refused there.

`config.htl.methods` x `config.htl.seeds` run on the same data (jaxmed.train.comparison);
workdir/report/ holds comparison.csv (test metrics overall and per sub-population the data
marks, means and _std over seeds), summary.md and the figures (report.py).

Decisions beyond the spec: the first identification is after `every_epochs` epochs (an untrained
model's disagreement says nothing); the baseline runs no identification; each run's seed (init
and data order) is its entry of `htl.seeds` (config.seed is not used).
"""

from __future__ import annotations

import json
import logging
import numbers
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmed import data as data_lib
from jaxmed.data.pipeline import Preprocess, eval_batches, train_stream, weighted_train_stream
from jaxmed.methods import supervised, tear
from jaxmed.methods.htl import driver, semi, trainer
from jaxmed.methods.tear import data as ssl_data
from jaxmed.models import create_model
from jaxmed.models.unet import load_encoder
from jaxmed.pruning.sweep import check_axis
from jaxmed.train import build, comparison, sharding, steps
from jaxmed.train import workdir as workdir_lib
from jaxmed.train.loop import LoopSettings, train_loop
from jaxmed.train.writers import MetricWriter

log = logging.getLogger(__name__)

TASKS = ("classification", "segmentation", "semi_supervised", "weak_localization")
METHODS = ("baseline", "htl_weight", "htl_oversample")
MASK_TASKS = ("segmentation", "weak_localization")
ATTENTION = {"baseline": None, "htl_weight": "weight", "htl_oversample": "oversample"}
HARMLESS_KEYS = ("htl.identify_batch_size", "htl.level_axis", "htl.grid")
TASK_METRICS = {
    "segmentation": ("iou", "dice", "thresholded_jaccard"),
    "classification": ("auc", "balanced_accuracy"),
    "semi_supervised": ("auc", "balanced_accuracy"),
    "weak_localization": ("auc", "balanced_accuracy", "cam_iou", "cam_dice",
                          "cam_thresholded_jaccard"),
}


def default_config() -> ml_collections.ConfigDict:
    c = supervised.default_config()
    c.method = "htl"
    c.htl = ml_collections.ConfigDict(dict(
        task="segmentation",
        methods=METHODS,
        seeds=(0, 1, 2),
        every_epochs=2,  # identification cadence K (first after K epochs)
        sparsities=(0.3, 0.5, 0.7, 0.9),  # global-magnitude levels, no fine-tuning
        iou_threshold=0.5,  # segmentation: a level disagrees when IoU(dense, pruned) < this
        rule="majority",  # segmentation: 'majority' or 'any' of the levels
        top_q=0.0,  # 0: the HTL set is the disagreeing samples; in (0, 1]: the top q by score
        weight=3.0,  # lambda: loss weight / oversampling factor of HTL samples
        level_axis="map",  # 'map' (one masked copy at a time) or 'vmap'
        identify_batch_size=0,  # global; 0 = train.eval_batch_size
        dice_weight=1.0, bce_weight=1.0,  # segmentation loss
        cam_threshold=0.5,  # weak localization: CAM (max-normalized) >= this is lesion
        grid=8,  # HTL examples in report/htl_examples.png
        ssl_algorithm="fixmatch",  # semi_supervised: the TEAR-family step (tear.algorithms)
    ))
    # semi_supervised: TEAR's block (split, mu, views, EMAs, ...); htl.methods / htl.seeds
    # drive the comparison, so TEAR's own methods / seeds keys are left out
    c.ssl = ml_collections.ConfigDict({k: v for k, v in tear.default_config().ssl.items()
                                       if k not in ("methods", "seeds")})
    c.model.name = "unet_resnet18"
    return c


def check_config(config) -> None:
    """Fail before anything runs, naming the key."""
    h = config.htl
    if h.task not in TASKS:
        raise ValueError(f"config.htl.task={h.task!r}: use one of {list(TASKS)}")
    comparison.check_methods_and_seeds(h.methods, h.seeds, METHODS, "htl")
    if h.task == "semi_supervised":
        semi.check_config(config)
    sp = h.sparsities
    if (isinstance(sp, str) or not isinstance(sp, (tuple, list)) or not sp
            or not all(isinstance(s, numbers.Real) and 0 < s < 1 for s in sp)):
        raise ValueError(f"config.htl.sparsities={sp!r} must be a tuple of fractions in (0, 1)")
    if h.every_epochs < 1:
        raise ValueError(f"config.htl.every_epochs={h.every_epochs} must be >= 1")
    if not 0 <= h.top_q <= 1:
        raise ValueError(f"config.htl.top_q={h.top_q} must be 0 (disagreeing samples) or in "
                         "(0, 1]")
    if h.weight <= 0:
        raise ValueError(f"config.htl.weight={h.weight} must be > 0")
    if h.rule not in ("majority", "any"):
        raise ValueError(f"config.htl.rule={h.rule!r}: use 'majority' or 'any'")
    check_axis(h.level_axis, "config.htl.level_axis")
    unet = config.model.name.startswith("unet_")
    if h.task == "segmentation" and not unet:
        raise ValueError(f"config.model.name={config.model.name!r}: htl.task='segmentation' "
                         "needs a U-Net (unet_resnet18 / unet_resnet34 / unet_resnet50)")
    if h.task != "segmentation" and unet:
        raise ValueError(f"config.model.name={config.model.name!r}: htl.task={h.task!r} "
                         "trains a classifier (e.g. resnet18)")
    if h.task == "weak_localization" and not config.model.name.startswith("resnet"):
        raise ValueError(f"config.model.name={config.model.name!r}: class activation maps "
                         "need a ResNet classifier")
    if (h.task in MASK_TASKS and config.data.name == "synthetic"
            and not config.data.synthetic.with_mask):
        raise ValueError(f"htl.task={h.task!r} needs masks: set "
                         "config.data.synthetic.with_mask=True")


def train_and_evaluate(config, workdir: str) -> dict:
    """Every method x seed (finished runs skipped), then the report; returns its headline."""
    from jaxmed.methods.htl import report

    check_config(config)
    workdir_lib.write_config(config, workdir, harmless=HARMLESS_KEYS)
    h = config.htl
    results = comparison.run_all(workdir, h.methods, h.seeds,
                                 lambda m, s, d: run_one(config, m, s, d))
    if not sharding.is_lead_process():
        return {}
    return report.write_report(config, workdir, results)


# ------------------------------------------------------------------------------ one run
def build_model(config, num_classes: int):
    mc = config.model
    if config.htl.task == "segmentation":
        kw = {"stem": mc.stem, **({"width": mc.width} if mc.width else {})}
        return create_model(mc.name, 1, dtype=mc.dtype, **kw)
    return build.build_model(mc, num_classes)


def init_variables(model, config, rng, image_shape) -> dict:
    """Random init; a U-Net's encoder from a torchvision ResNet file, or any jaxmed workdir."""
    mc = config.model
    if config.htl.task != "segmentation" or not mc.pretrained or os.path.isdir(mc.pretrained):
        return build.init_variables(model, mc, rng, image_shape)
    import torch

    variables = jax.device_get(dict(jax.jit(lambda r, x: model.init(r, x, train=False))(
        rng, jnp.zeros((1, *image_shape), jnp.float32))))
    sd = torch.load(mc.pretrained, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return load_encoder(variables, sd, mc.name.removeprefix("unet_"))


def check_data(ds, task: str, name: str) -> None:
    rec = ds["train"][0]
    if task in MASK_TASKS and "mask" not in rec:
        raise ValueError(f"htl.task={task!r} needs lesion masks, and config.data.name={name!r} "
                         "has none (use isic2018_seg, or synthetic with with_mask=True)")
    if task != "segmentation" and ds.info.num_classes < 2:
        raise ValueError(f"htl.task={task!r} needs at least 2 classes; config.data.name="
                         f"{name!r} has {ds.info.class_names}")


def run_one(config, method: str, seed: int, workdir: str) -> dict:
    """Train and test one (method, seed); returns flat final metrics ('test/...')."""
    if config.htl.task == "semi_supervised":
        return semi.run_one(config, method, seed, workdir, attention=ATTENTION[method])
    h, tcfg = config.htl, config.train
    task = h.task
    base_task = "segmentation" if task == "segmentation" else "classification"
    mesh = sharding.make_mesh()
    sharding.check_global_batch(tcfg.batch_size, mesh)
    ds = data_lib.build(config.data)
    check_data(ds, task, config.data.name)
    info = ds.info
    size = data_lib.image_size(config.data, info)
    channels = data_lib.image_channels(config.data, info)
    model = build_model(config, info.num_classes)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    steps_per_epoch = len(ds["train"]) // tcfg.batch_size
    total = build.total_steps(tcfg, steps_per_epoch)
    tx = build.make_optimizer(tcfg, total)
    variables = init_variables(model, config, init_rng, (size, size, channels))
    positions = ssl_data.record_indices(ds["train"])
    state = build.create_state(variables, tx, state_rng, mesh)
    state = jax.device_put(trainer.HtlState.from_train_state(state, int(positions.max()) + 1),
                           sharding.replicated(mesh))
    dtype = jnp.dtype(config.model.dtype)
    train_step = steps.jit_train_step(trainer.make_train_step(
        model, tx, task=base_task, compute_dtype=dtype, dice_weight=h.dice_weight,
        bce_weight=h.bce_weight), mesh)
    if task == "segmentation":
        pred = trainer.make_segmentation_predict(model, compute_dtype=dtype)
    else:
        pred = trainer.make_classification_predict(
            model, compute_dtype=dtype,
            cam_threshold=h.cam_threshold if task == "weak_localization" else None)
    eval_pre = Preprocess(size, channels, "", seed, config.data.on_error)
    train_pre = Preprocess(size, channels, config.data.train_augment, seed,
                           config.data.on_error)

    def batches(split, batch_size=tcfg.eval_batch_size):
        return eval_batches(ds[split], global_batch=batch_size, preprocess=eval_pre,
                            num_workers=config.data.num_workers)

    evaluate = trainer.SplitEvaluator(steps.jit_eval_step(pred, mesh), batches, mesh, task)
    attention = ATTENTION[method]
    epochs = max(tcfg.epochs, 1) if tcfg.steps <= 0 else -(-tcfg.steps // steps_per_epoch)
    current = {}

    def make_stream():
        kw = dict(global_batch=tcfg.batch_size, preprocess=train_pre, seed=seed,
                  num_epochs=epochs, num_workers=config.data.num_workers)
        current["stream"] = (weighted_train_stream(ds["train"], **kw)
                             if attention == "oversample" else train_stream(ds["train"], **kw))
        return current["stream"]

    writer = MetricWriter(workdir, enabled=sharding.is_lead_process())
    hooks = []
    hook = None
    sparsities = tuple(float(s) for s in h.sparsities)
    ident_bs = h.identify_batch_size or tcfg.eval_batch_size
    if attention is not None:
        sharding.check_global_batch(ident_bs, mesh, key="eval_batch_size")
        identify_fn = driver.make_identify_fn(
            model, task=base_task, iou_threshold=h.iou_threshold, rule=h.rule,
            level_axis=h.level_axis, mesh=mesh, compute_dtype=dtype)
        hook = driver.HtlHook(
            identify_fn, lambda: batches("train", ident_bs), mesh, sparsities,
            every=h.every_epochs * steps_per_epoch, total=total, attention=attention,
            weight=float(h.weight), top_q=h.top_q or None, positions=positions,
            stream=lambda: current["stream"], writer=writer, workdir=workdir)
        hooks.append(hook)
    try:
        state, final = train_loop(
            workdir=workdir, settings=LoopSettings.from_config(tcfg), state=state,
            train_step=train_step, make_stream=make_stream, evaluate=evaluate, mesh=mesh,
            writer=writer, meta={"config": json.loads(config.to_json()), "method": method,
                                 "seed": seed},
            state_hooks=hooks, global_batch=tcfg.batch_size)
    finally:
        writer.close()
    result = {f"test/{k}": v for k, v in final.items()}
    if hook is not None:
        result["identify_seconds"] = float(np.mean(hook.seconds)) if hook.seconds else 0.0
        driver.save_last_examples(
            workdir, driver.make_examples_fn(model, task=base_task, compute_dtype=dtype), state,
            sparsities, ds["train"], positions, eval_pre, h.grid)
    return result
