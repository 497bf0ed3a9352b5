"""How HTL's runs are built on `jaxmed.train.run`, and the comparison's `run_one`.

`supervised_run` (classification, segmentation, weak localization): HTL's own model (a U-Net
with one output for segmentation, its encoder optionally from a torchvision ResNet file), steps
and evaluator (`step.py`: metrics overall and per sub-population), on the kit's durations, loop
settings and stream; 'htl_oversample' draws from a weighted stream the hook re-weighs.
`semi_supervised_run`: TEAR's run (`jaxmed.methods.tear.run.build_ssl_run`: the labeled /
unlabeled split of `config.ssl`, the two-view stream, the step of `htl.ssl_algorithm`) with
HTL's evaluator. `attend` adds the identification hook (`attention.AttentionHook`) for every
method but the baseline; `run_one` trains through `fit`.

Decisions (semi-supervised):
  - the HTL set is among the UNLABELED samples: a sample is hard when the dense pseudo label (its
    top-1) is not the pruned copies' majority vote (the classification rule of `identify.py`),
    identified every `htl.every_epochs` epochs of one pass over the unlabeled set (mu B images
    per step, as TEAR counts an epoch); attention 'weight' sets `state.sample_weight[index]` =
    `htl.weight` on that set and 1 elsewhere, and TEAR's step multiplies every unlabeled loss
    term by it (masks, pseudo labels and memories unchanged). Labeled samples are never
    identified and keep weight 1.
  - oversampling ('htl_oversample') is refused: TEAR's unlabeled stream has no sampling weights.
  - evaluation uses HTL's evaluator (AUC / balanced accuracy overall and per sub-population the
    data marks), not TEAR's, so the report has the group columns.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import data as data_lib
from jaxmed.config_check import ConfigKeyError
from jaxmed.data.pipeline import Preprocess, eval_batches, weighted_train_stream
from jaxmed.data.sources import record_indices
from jaxmed.methods.htl import attention, identify, step
from jaxmed.methods.tear.run import build_ssl_run
from jaxmed.models import create_model
from jaxmed.models.unet import load_encoder
from jaxmed.train import build, sharding, steps
from jaxmed.train import run as train_run

MASK_TASKS = ("segmentation", "weak_localization")
ATTENTION = {"baseline": None, "htl_weight": "weight", "htl_oversample": "oversample"}


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


def supervised_run(config, method: str, seed: int) -> train_run.Run:
    """The run of `htl.task` 'classification', 'segmentation' or 'weak_localization' (seed: init
    and data order); `run.extras` says what identification reads."""
    h, tcfg, task = config.htl, config.train, config.htl.task
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
    d = train_run.durations(tcfg, train_run.steps_per_epoch(len(ds["train"]), tcfg.batch_size))
    tx = build.make_optimizer(tcfg, d.total)
    variables = init_variables(model, config, init_rng, (size, size, channels))
    positions = record_indices(ds["train"])
    state = build.create_state(variables, tx, state_rng, mesh,
                               index_bound=int(positions.max()) + 1)
    dtype = jnp.dtype(config.model.dtype)
    train_step = steps.jit_train_step(step.make_train_step(
        model, tx, task=base_task, compute_dtype=dtype, dice_weight=h.dice_weight,
        bce_weight=h.bce_weight), mesh)
    if task == "segmentation":
        pred = step.make_segmentation_predict(model, compute_dtype=dtype)
    else:
        pred = step.make_classification_predict(
            model, compute_dtype=dtype,
            cam_threshold=h.cam_threshold if task == "weak_localization" else None)
    eval_pre = train_run.eval_preprocess(config, info, seed)
    workers = config.data.num_workers

    current = {}
    if ATTENTION[method] == "oversample":
        make_stream = weighted_stream_factory(config, ds["train"], info, seed, d, current)
    else:
        make_stream = train_run.stream_factory(config, ds["train"], info, seed, d)
    return train_run.Run(
        mesh, state, train_step, make_stream,
        step.make_evaluator(steps.jit_eval_step(pred, mesh), ds.splits, task=task,
                            batch_size=tcfg.eval_batch_size, preprocess=eval_pre, mesh=mesh,
                            num_workers=workers),
        train_run.loop_settings(tcfg, d), tcfg.batch_size, d,
        train_run.run_meta(config, method=method, seed=seed), model=model, tx=tx, ds=ds,
        extras={"task": base_task, "identified": ds["train"], "positions": positions,
                "preprocess": eval_pre, "num_workers": workers,
                "stream": lambda: current.get("stream")})


def weighted_stream_factory(config, source, info, seed: int, d: train_run.Durations,
                            current: dict):
    """As `train.run.stream_factory`, but each stream's sampling weights can change between
    epochs; the latest stream is `current['stream']`, for the hook to re-weigh."""
    pre = Preprocess(data_lib.image_size(config.data, info),
                     data_lib.image_channels(config.data, info), config.data.train_augment,
                     seed, config.data.on_error)

    def make_stream():
        current["stream"] = weighted_train_stream(
            source, global_batch=config.train.batch_size, preprocess=pre, seed=seed,
            num_epochs=d.num_epochs, num_workers=config.data.num_workers)
        return current["stream"]

    return make_stream


def semi_supervised_run(config, method: str, seed: int) -> train_run.Run:
    """TEAR's run of `htl.ssl_algorithm` with HTL's evaluator; identification reads the
    unlabeled set (see the module docstring)."""
    run = build_ssl_run(config, config.htl.ssl_algorithm, seed)
    ev, unlabeled = run.evaluator, run.extras["unlabeled"]
    pred = step.make_classification_predict(run.model,
                                            compute_dtype=jnp.dtype(config.model.dtype))
    evaluate = step.make_evaluator(steps.jit_eval_step(pred, run.mesh), ev.splits,
                                   task="classification", batch_size=ev.batch_size,
                                   preprocess=ev.preprocess, mesh=run.mesh,
                                   num_workers=ev.num_workers)
    return dataclasses.replace(
        run, evaluate=evaluate, meta=train_run.run_meta(config, method=method, seed=seed),
        extras={**run.extras, "task": "classification", "identified": unlabeled,
                "positions": record_indices(unlabeled), "preprocess": ev.preprocess,
                "num_workers": ev.num_workers, "stream": lambda: None})


def attend(run: train_run.Run, config, method: str, workdir: str
           ) -> tuple[train_run.Run, attention.AttentionHook | None]:
    """`run` with `method`'s identification hook among its state hooks (the baseline: none)."""
    if ATTENTION[method] is None:
        return run, None
    h, x = config.htl, run.extras
    d = run.durations
    if d.epochs(h.every_epochs) >= d.total:  # check_config refuses what the config shows
        raise ConfigKeyError(
            f"config.htl.every_epochs={h.every_epochs} ({d.epochs(h.every_epochs)} steps at "
            f"{d.steps_per_epoch} steps per epoch) is not before the run's end at step "
            f"{d.total} (config.train.steps / epochs): no identification would happen and "
            f"{method} would train as the baseline; lower htl.every_epochs")
    ident_bs = h.identify_batch_size or config.train.eval_batch_size
    sharding.check_global_batch(ident_bs, run.mesh, key="eval_batch_size")
    identify_fn = identify.make_identify_fn(
        run.model, task=x["task"], iou_threshold=h.iou_threshold, rule=h.rule,
        level_axis=h.level_axis, mesh=run.mesh, compute_dtype=jnp.dtype(config.model.dtype))
    hook = attention.AttentionHook(
        identify_fn, lambda: eval_batches(x["identified"], global_batch=ident_bs,
                                          preprocess=x["preprocess"],
                                          num_workers=x["num_workers"]),
        run.mesh, tuple(float(s) for s in h.sparsities),
        every=run.durations.epochs(h.every_epochs), total=run.durations.total,
        attention=ATTENTION[method], weight=float(h.weight), top_q=h.top_q or None,
        positions=x["positions"], stream=x["stream"], workdir=workdir)
    return dataclasses.replace(run, state_hooks=(*run.state_hooks, hook.with_writer)), hook


def run_one(method: str, seed: int, workdir: str, config) -> dict:
    """Train and test one (method, seed) in `workdir` (its sub-run config); flat final metrics
    ('test/...')."""
    semi = config.htl.task == "semi_supervised"
    run = (semi_supervised_run if semi else supervised_run)(config, method, seed)
    run, hook = attend(run, config, method, workdir)
    state, final = train_run.fit(run, workdir)
    result = {f"test/{k}": v for k, v in final.items()}
    x = run.extras
    if semi:
        result["data/num_labeled"] = float(len(x["labeled"]))
        result["data/num_unlabeled"] = float(len(x["unlabeled"]))
    if hook is not None:
        result["identify_seconds"] = float(np.mean(hook.seconds)) if hook.seconds else 0.0
        examples_fn = attention.make_examples_fn(run.model, task=x["task"],
                                                 compute_dtype=jnp.dtype(config.model.dtype))
        attention.save_last_examples(workdir, examples_fn, state, hook.sparsities,
                                     x["identified"], x["positions"], x["preprocess"],
                                     config.htl.grid)
    return result
