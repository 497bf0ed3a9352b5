"""Frozen teachers: a jaxmed workdir (its best checkpoint and the model of its config.json) or a
PyTorch file (`config.kd.teacher_model` names the architecture; torch is imported only while
converting). Also the quick configs' teacher stage: a supervised run on balanced data.

Torch names: resnet18 / resnet50 (torchvision layout), moco_v2_resnet50 (`module.encoder_q.*`,
its MLP head dropped: the target is the 2048-d pooled feature), dinov2_vits14 / dinov2_vitb14
(official layout; target = the normed CLS token, positional embedding interpolated to the input).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxmed.models import create_model
from jaxmed.models.convert import load_torch_checkpoint
from jaxmed.train import build, comparison

TORCH_ARCHS = {"resnet18": "resnet18", "resnet50": "resnet50", "moco_v2_resnet50": "resnet50",
               "dinov2_vits14": "dinov2_vits14", "dinov2_vitb14": "dinov2_vitb14"}
HEAD_NAMES = ("fc", "head", "classifier")


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
    model: Any
    variables: dict  # {'params', 'batch_stats'} (numpy)
    num_classes: int  # of its own head
    feature_dim: int
    image_size: int  # input side it is fed
    source: str


def _feature_dim(model, variables, size: int) -> int:
    shape = jax.eval_shape(functools.partial(model.apply, train=False, features=True),
                           variables, jnp.zeros((1, size, size, 3), jnp.float32))
    return int(shape[1].shape[-1])


def _head_classes(params) -> int:
    for name in HEAD_NAMES:
        if name in params and "kernel" in params[name]:
            return int(params[name]["kernel"].shape[-1])
    raise ValueError(f"teacher params have no classifier head among {HEAD_NAMES} "
                     f"(top-level keys: {sorted(params)[:10]})")


def from_workdir(workdir: str, image_size: int) -> Teacher:
    """The model a jaxmed run trained (its config.json `model` block), with the checkpoint its
    model selection chose (else its last)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.kd.teacher={workdir!r}: no config.json there (not a "
                                "jaxmed workdir?)")
    with open(path) as f:
        saved = json.load(f)
    if "model" not in saved:
        raise ValueError(f"{path}: no 'model' block; cannot rebuild the teacher")
    variables = build.load_workdir_variables(workdir)
    model_cfg = ml_collections.ConfigDict(saved["model"])
    model = build.build_model(model_cfg, _head_classes(variables["params"]))
    return Teacher(model, variables, _head_classes(variables["params"]),
                   _feature_dim(model, variables, image_size), image_size, workdir)


def from_torch(path: str, arch: str, image_size: int) -> Teacher:
    """A PyTorch checkpoint converted into the jaxmed model named by `arch`."""
    if arch not in TORCH_ARCHS:
        raise ValueError(f"config.kd.teacher_model={arch!r}: a PyTorch teacher needs one of "
                         f"{sorted(TORCH_ARCHS)}")
    name = TORCH_ARCHS[arch]
    if name.startswith("dinov2") and image_size % 14:
        raise ValueError(f"config.kd.teacher_image_size={image_size}: a DINOv2 teacher needs a "
                         "multiple of 14 (e.g. 224)")
    kw = {} if name.startswith("dinov2") else {"stem": "imagenet"}
    model = create_model(name, 1000, **kw)
    init = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    variables = load_torch_checkpoint(path, name, target=jax.device_get(dict(init)))
    variables.setdefault("batch_stats", {})
    return Teacher(model, variables, 1000, _feature_dim(model, variables, image_size),
                   image_size, path)


def load_teacher(kd_cfg, student_size: int) -> Teacher:
    """The teacher `config.kd` names, fed `teacher_image_size` px (0: the student's size)."""
    size = int(kd_cfg.teacher_image_size or student_size)
    path = kd_cfg.teacher
    if not path:
        raise ValueError("config.kd.teacher is empty: name a jaxmed workdir or a PyTorch file "
                         "(or set config.kd.teacher_stage.epochs > 0 to train one first)")
    if os.path.isdir(path):
        return from_workdir(path, size)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.kd.teacher={path!r} is neither a jaxmed workdir nor a "
                                "file")
    if not kd_cfg.teacher_model:
        raise ValueError(f"config.kd.teacher={path!r} is a file: set config.kd.teacher_model to "
                         f"its architecture ({sorted(TORCH_ARCHS)})")
    return from_torch(path, kd_cfg.teacher_model, size)


def train_teacher_stage(config, workdir: str) -> str:
    """The quick configs' first stage: a supervised teacher on balanced data of the same kind
    (synthetic: imbalance 1, `teacher_stage.num_train` images), trained by the kit into
    workdir/teacher and marked finished by its atomic `result.json` (its test metrics); skipped
    when that exists. Returns the teacher's workdir."""
    from jaxmed.methods import supervised

    ts = config.kd.teacher_stage
    out = os.path.join(workdir, "teacher")
    if comparison.read_result(out) is not None:
        return out
    c = supervised.default_config()
    c.seed = config.seed
    c.data = copy.deepcopy(config.data)
    if c.data.name == "synthetic":
        c.data.synthetic.imbalance = 1.0
        c.data.synthetic.test_imbalance = 1.0
        if ts.num_train:
            c.data.synthetic.num_train = ts.num_train
    c.model.name, c.model.width, c.model.stem = ts.model, ts.width, ts.stem
    c.train.batch_size = config.train.batch_size
    c.train.eval_batch_size = config.train.eval_batch_size
    c.train.epochs, c.train.lr = ts.epochs, ts.lr
    c.train.optimizer, c.train.schedule = "adam", "cosine"
    c.train.eval_every, c.train.log_every = -1, config.train.log_every
    c.train.progress = config.train.progress
    os.makedirs(out, exist_ok=True)
    result = supervised.train_and_evaluate(c, out)
    comparison.write_result(out, {k: float(v) for k, v in result.items()})
    return out
