"""Frozen teachers: a jaxmed workdir (its best checkpoint and the model of its config.json) or a
PyTorch file (`config.kd.teacher_model` names the architecture; torch is imported only while
converting). Also the quick configs' teacher stage: a supervised run on balanced data.

Torch names: resnet18 / resnet50 (torchvision layout), moco_v2_resnet50 (`module.encoder_q.*`,
its MLP head dropped: the target is the 2048-d pooled feature), dinov2_vits14 / dinov2_vitb14
(official layout; target = the normed CLS token, positional embedding interpolated to the input).
A .pth head is kept when it is a classifier over the features (its class count read off it),
else a 1000-class head stands in (MoCo, DINOv2 backbones: only their features are used).

What a teacher is fed is its own: its input channels are read off its weights (the first
layer's kernel), its image size and class names come from the data its workdir's config.json
names (rebuilt from that block; `config.kd.teacher_image_size` / `teacher_classes` where that
data cannot be read here, and for a .pth). jaxmed normalises every image with ImageNet's
statistics (`augment.normalize`: per channel, their means for one channel), as torchvision's
and DINOv2's teachers expect, so normalisation follows from the channel count. A student whose
images have other channels is adapted (`ChannelAdapter`): a 1-channel student's gray image is
repeated for an RGB teacher (as torchvision teachers are fed X-rays), a 3-channel student's
image reaches a 1-channel teacher as its luminance (what jaxmed's decoder gives a 1-channel
run of the same files); each side keeps its own normalisation. Other counts are refused.

A teacher whose head has the data's class count is the data's classifier (Hinton KD's logits,
the report's teacher accuracy) only if its classes are the data's, in order (`check_classes`).
Its identity (`identity`: a .pth's content hash; a workdir's config.json hash, checkpoint step
and weights hash) is recorded in the comparison's workdir (`record_identity`, teacher.json):
a teacher replaced between a kill and the resume is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jaxmed import data as data_lib
from jaxmed.config_check import InputError
from jaxmed.data import augment
from jaxmed.models import create_model
from jaxmed.models.convert import load_torch_checkpoint
from jaxmed.train import build, comparison, sharding

log = logging.getLogger(__name__)

TORCH_ARCHS = {"resnet18": "resnet18", "resnet50": "resnet50", "moco_v2_resnet50": "resnet50",
               "dinov2_vits14": "dinov2_vits14", "dinov2_vitb14": "dinov2_vitb14"}
HEAD_NAMES = ("fc", "head", "classifier")
IDENTITY = "teacher.json"  # in the comparison's workdir
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's 'RGB' -> 'L' (jaxmed's 1-channel decode)


@dataclasses.dataclass(frozen=True)
class ChannelAdapter:
    """The teacher `inner` fed a student's normalised `student_channels` view as the
    `teacher_channels` view jaxmed would have given it of the same image: 1 -> 3 repeats the
    gray level, 3 -> 1 takes the luminance (`LUMA`); each side under its own normalisation.
    Has the `apply` of a flax module (hashable: a static argument of jitted functions)."""

    inner: Any
    student_channels: int
    teacher_channels: int

    def adapt(self, x):
        dtype = x.dtype
        mean = np.asarray(augment.IMAGENET_MEAN, np.float32)
        std = np.asarray(augment.IMAGENET_STD, np.float32)
        x = x.astype(jnp.float32)
        if self.student_channels == 1:  # the gray level, repeated, under RGB statistics
            y = (x * std.mean() + mean.mean() - mean) / std
        else:  # the luminance of the RGB image, under the 1-channel statistics
            rgb = x * std + mean
            y = (rgb @ jnp.asarray(LUMA, jnp.float32)[:, None] - mean.mean()) / std.mean()
        return y.astype(dtype)

    def apply(self, variables, x, *args, **kwargs):
        return self.inner.apply(variables, self.adapt(x), *args, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
    model: Any  # a flax module, or a ChannelAdapter around one (`for_channels`)
    variables: dict  # {'params', 'batch_stats'} (numpy)
    num_classes: int  # of its own head
    feature_dim: int
    image_size: int  # input side it is fed
    source: str
    channels: int = 3  # input channels its weights take
    class_names: tuple[str, ...] | None = None  # of its head's outputs, where known
    identity: dict = dataclasses.field(default_factory=dict)  # what `record_identity` keeps

    def for_channels(self, channels: int) -> Teacher:
        """This teacher fed a `channels`-channel student's images (itself if they match)."""
        inner = self.model.inner if isinstance(self.model, ChannelAdapter) else self.model
        if channels == self.channels:
            return self if inner is self.model else dataclasses.replace(self, model=inner)
        if {int(channels), self.channels} != {1, 3}:
            raise InputError(f"teacher {self.source} takes {self.channels}-channel images and "
                             f"the student's have {channels}: only 1 <-> 3 channels are "
                             "adapted (set config.data.channels)")
        return dataclasses.replace(self, model=ChannelAdapter(inner, int(channels),
                                                              self.channels))


def _feature_dim(model, variables, size: int, channels: int = 3) -> int:
    shape = jax.eval_shape(functools.partial(model.apply, train=False, features=True),
                           variables, jnp.zeros((1, size, size, channels), jnp.float32))
    return int(shape[1].shape[-1])


def _input_channels(model, params, size: int, source: str) -> int:
    """1 or 3: the input channels `params` (converted or restored) were made for, from the
    shapes of the layers that depend on them (a conv stem's kernel, a ViT's patch embedding)."""
    shapes = {}
    for c in (3, 1):
        tree = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, size, size, c), jnp.float32))
        shapes[c] = {k: tuple(v.shape) for k, v in
                     traverse_util.flatten_dict(dict(tree["params"]), sep="/").items()}
    flat = {k: tuple(np.shape(v)) for k, v in
            traverse_util.flatten_dict(dict(params), sep="/").items()}
    first = [k for k in shapes[3] if shapes[1].get(k) != shapes[3][k]]
    for c in (3, 1):
        if first and all(flat.get(k) == shapes[c][k] for k in first):
            return c
    got = {k: flat.get(k) for k in first}
    raise InputError(f"teacher {source}: its first layer {got} fits neither 1- nor 3-channel "
                     f"images of its model ({type(model).__name__})")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_tree(tree) -> str:
    h = hashlib.sha256()
    for key, v in sorted(traverse_util.flatten_dict(dict(tree), sep="/").items()):
        a = np.ascontiguousarray(np.asarray(v))
        h.update(f"{key}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _stated_names(own, stated, num_classes: int, source: str):
    """The teacher's class names: its own (a workdir's data) or those config.kd.teacher_classes
    states (a .pth, or a workdir whose data cannot be read here); both given must agree."""
    stated = tuple(stated or ())
    if stated and len(stated) != num_classes:
        raise InputError(f"config.kd.teacher_classes has {len(stated)} names but the teacher's "
                         f"head ({source}) has {num_classes} outputs")
    if own is not None and len(own) != num_classes:
        own = None  # its data's classes are not its head's outputs
    if own is None:
        return stated or None
    if stated and stated != own:
        raise InputError(f"config.kd.teacher_classes={stated!r} is not teacher {source}'s own: "
                         f"its data's {own!r} (from its config.json); leave the key empty for "
                         "a jaxmed workdir")
    return own


def read_workdir_config(workdir: str) -> dict:
    """A teacher workdir's config.json (with its 'model' block); errors name the file."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"config.kd.teacher={workdir!r} is a folder but not a jaxmed workdir: "
                         "no config.json in it")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}): the teacher's model is rebuilt from it; "
                         "restore it or retrain the teacher") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise InputError(f"{path}: no 'model' block; cannot rebuild the teacher")
    return saved


def check_teacher_path(kd_cfg) -> None:
    """What can be known of `config.kd.teacher` before any work: it exists; a folder is a
    jaxmed workdir (a readable config.json with its model, a saved checkpoint); a file has its
    architecture named. One-line ValueErrors naming the key."""
    path = kd_cfg.teacher
    if not os.path.exists(path):
        raise InputError(f"config.kd.teacher={path!r} does not exist: name a jaxmed workdir or "
                         "a PyTorch file")
    if os.path.isdir(path):
        read_workdir_config(path)
        ck = os.path.join(path, "checkpoints")
        if not os.path.isdir(ck) or not any(e.isdigit() for e in os.listdir(ck)):
            raise InputError(f"config.kd.teacher={path!r} holds no checkpoint ({ck} is missing "
                             "or empty): a teacher is a run that saved one")
    elif not kd_cfg.teacher_model:
        raise InputError(f"config.kd.teacher={path!r} is not a workdir: set "
                         f"config.kd.teacher_model ({sorted(TORCH_ARCHS)})")


def _restore(workdir: str) -> tuple[dict, int]:
    """({'params', 'batch_stats'}, step) of the checkpoint the run's model selection chose
    (else its latest); an unreadable one is an error naming it and what to delete."""
    from jaxmed.train.checkpoint import Checkpointer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"teacher workdir {workdir} holds no checkpoints/ (not a jaxmed "
                                "workdir?)")
    ck = Checkpointer(directory, keep=0)
    step = ck.latest_step()
    try:
        if step is None:
            raise FileNotFoundError(f"teacher workdir {workdir}: no checkpoint in {directory}")
        best = ck.best_step()
        step = step if best is None else best
        state, _ = ck.restore_raw(step)
        variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
        bad = [k for k, v in traverse_util.flatten_dict(variables, sep="/").items()
               if not np.isfinite(np.asarray(v)).all()]
        if bad:
            raise InputError(f"non-finite values in {bad[:3]}")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
        where = directory if step is None else os.path.join(directory, str(step))
        first = (str(e).splitlines() or [""])[0][:200]
        raise InputError(f"teacher workdir {workdir}: its checkpoint {where} is unreadable "
                         f"({type(e).__name__}: {first}): delete {where} (the checkpoint before "
                         "it is used then), or retrain the teacher") from None
    finally:
        ck.close()
    return variables, int(step)


def _data_info(saved: dict, workdir: str):
    """(class names, image size) of the data a workdir's run trained on, rebuilt from its
    config.json (tables and listings only, no image read); (None, 0) if it cannot be here."""
    try:
        cfg = ml_collections.ConfigDict(saved["data"])
        ds = data_lib.build(cfg, check_files=False)
        return tuple(ds.info.class_names), int(data_lib.image_size(cfg, ds.info))
    except Exception as e:  # noqa: BLE001 (moved data, an older config: said, then stated keys)
        log.warning("teacher %s: its training data (config.json 'data') cannot be read here "
                    "(%s: %s); its class names come from config.kd.teacher_classes, its image "
                    "size from config.kd.teacher_image_size", workdir, type(e).__name__,
                    (str(e).splitlines() or [""])[0][:200])
        return None, 0


def _head_classes(params) -> int:
    for name in HEAD_NAMES:
        if name in params and "kernel" in params[name]:
            return int(params[name]["kernel"].shape[-1])
    raise InputError(f"teacher params have no classifier head among {HEAD_NAMES} "
                     f"(top-level keys: {sorted(params)[:10]})")


def from_workdir(workdir: str, image_size: int = 0, *, class_names=()) -> Teacher:
    """The model a jaxmed run trained (its config.json `model` block), with the checkpoint its
    model selection chose (else its last), fed `image_size` px (0: the size it trained at) on
    the channels its weights take; its class names are its data's (`class_names`, i.e.
    config.kd.teacher_classes, where that data cannot be read here)."""
    saved = read_workdir_config(workdir)
    with open(os.path.join(workdir, "config.json"), "rb") as f:
        config_sha = hashlib.sha256(f.read()).hexdigest()
    variables, ckpt_step = _restore(workdir)
    n = _head_classes(variables["params"])
    model = build.build_model(ml_collections.ConfigDict(saved["model"]), n)
    names, own_size = _data_info(saved, workdir)
    size = int(image_size or own_size)
    if not size:
        raise InputError(f"teacher workdir {workdir}: the image size it trained at is unknown "
                         "here (its data cannot be read): set config.kd.teacher_image_size")
    channels = _input_channels(model, variables["params"], size, workdir)
    identity = {"kind": "jaxmed workdir", "config_sha256": config_sha, "step": ckpt_step,
                "weights_sha256": _sha256_tree(variables)}
    return Teacher(model, variables, n, _feature_dim(model, variables, size, channels), size,
                   workdir, channels, _stated_names(names, class_names, n, workdir), identity)


def _torch_head_classes(params, name: str) -> int | None:
    """The class count of a converted .pth's own classifier (None: it has none, e.g. MoCo's
    query encoder without its MLP, a DINOv2 backbone)."""
    head = params.get("head" if name.startswith("dinov2") else "fc")
    if isinstance(head, dict) and np.ndim(head.get("kernel")) == 2 and "bias" in head:
        return int(np.shape(head["kernel"])[-1])
    return None


def from_torch(path: str, arch: str, image_size: int, *, class_names=()) -> Teacher:
    """A PyTorch checkpoint converted into the jaxmed model named by `arch`, its own head kept
    when it has one (`class_names`: config.kd.teacher_classes, its outputs' classes)."""
    if arch not in TORCH_ARCHS:
        raise InputError(f"config.kd.teacher_model={arch!r}: a PyTorch teacher needs one of "
                         f"{sorted(TORCH_ARCHS)}")
    name = TORCH_ARCHS[arch]
    if name.startswith("dinov2") and image_size % 14:
        raise InputError(f"config.kd.teacher_image_size={image_size}: a DINOv2 teacher needs a "
                         "multiple of 14 (e.g. 224)")
    kw = {} if name.startswith("dinov2") else {"stem": "imagenet"}
    raw = load_torch_checkpoint(path, name)  # to read its head and input channels off
    n = _torch_head_classes(raw["params"], name)
    model = create_model(name, n or 1000, **kw)
    channels = _input_channels(model, raw["params"], image_size, path)
    names = _stated_names(None, class_names, n or 1000, path) if n else None
    init = functools.partial(model.init, train=False)
    shape = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    # into the model's shapes; a part the file lacks (MoCo's, DINOv2's head) starts from init
    variables = load_torch_checkpoint(path, name, target=dict(jax.eval_shape(
        init, jax.random.PRNGKey(0), shape)))
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(variables)):
        variables = load_torch_checkpoint(path, name, target=jax.device_get(dict(jax.jit(init)(
            jax.random.PRNGKey(0), jnp.zeros(shape.shape, shape.dtype)))))
    variables.setdefault("batch_stats", {})
    return Teacher(model, variables, n or 1000,
                   _feature_dim(model, variables, image_size, channels), image_size, path,
                   channels, names, {"kind": "PyTorch file", "sha256": _sha256_file(path)})


def load_teacher(kd_cfg, student_size: int) -> Teacher:
    """The teacher `config.kd` names, fed `teacher_image_size` px (0: a workdir's own size, a
    .pth the student's)."""
    size = int(kd_cfg.teacher_image_size)
    path = kd_cfg.teacher
    if not path:
        raise InputError("config.kd.teacher is empty: name a jaxmed workdir or a PyTorch file "
                         "(or set config.kd.teacher_stage.epochs > 0 to train one first)")
    check_teacher_path(kd_cfg)
    if os.path.isdir(path):
        return from_workdir(path, size, class_names=kd_cfg.teacher_classes)
    return from_torch(path, kd_cfg.teacher_model, size or student_size,
                      class_names=kd_cfg.teacher_classes)


def check_classes(teacher: Teacher, data_names) -> None:
    """A teacher whose head has the data's class count is read as the data's classifier: its
    classes must be the data's, in the data's order (a ValueError naming both otherwise). With
    another count its head is not used (a probe is fitted on its features)."""
    data_names = tuple(data_names)
    if teacher.num_classes != len(data_names):
        return
    names = teacher.class_names
    if names is None:
        raise InputError(f"teacher {teacher.source} has a {teacher.num_classes}-class head like "
                         "the data: set config.kd.teacher_classes to the classes of its "
                         f"outputs, in order (the data's: {data_names!r}), so that its head can "
                         "be checked against the data's classes")
    if tuple(names) == data_names:
        return
    if sorted(names) == sorted(data_names):
        raise InputError(f"teacher {teacher.source}: its head's classes {tuple(names)!r} are "
                         f"the data's in another order {data_names!r}: its logits would be read "
                         "as the wrong classes")
    missing = [c for c in data_names if c not in names]
    extra = [c for c in names if c not in data_names]
    raise InputError(f"teacher {teacher.source}: its head's classes {tuple(names)!r} are not the "
                     f"data's {data_names!r} (not in the teacher: {missing}, not in the data: "
                     f"{extra})")


def for_data(teacher: Teacher, data_names, channels: int) -> Teacher:
    """The teacher checked against the data's classes (`check_classes`) and fed its images'
    channels (`Teacher.for_channels`)."""
    check_classes(teacher, data_names)
    return teacher.for_channels(channels)


def _describe(identity: dict) -> str:
    if "sha256" in identity:
        return f"{identity.get('kind', 'file')} sha256 {identity['sha256'][:12]}"
    return (f"{identity.get('kind', 'workdir')} config.json sha256 "
            f"{str(identity.get('config_sha256'))[:12]}, checkpoint step {identity.get('step')}, "
            f"weights sha256 {str(identity.get('weights_sha256'))[:12]}")


def _runs_made(workdir: str) -> list[str]:
    """The comparison's sub-runs that got as far as writing something (the superseded ones set
    aside as seed_<s>.old<k> excluded)."""
    from jaxmed.train.workdir import has_results

    root = os.path.join(workdir, "runs")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, m, s) for m in os.listdir(root)
                  if os.path.isdir(os.path.join(root, m))
                  for s in os.listdir(os.path.join(root, m))
                  if s.startswith("seed_") and s[5:].lstrip("-").isdigit()
                  and has_results(os.path.join(root, m, s)))


def check_identity(workdir: str, teacher: Teacher) -> bool:
    """Refuse a teacher other than the one whose identity `workdir/teacher.json` keeps, once
    sub-runs were made with that one (its students and this one's would share a comparison);
    returns whether teacher.json is to be (re)written. Before any work."""
    path = os.path.join(workdir, IDENTITY)
    if not os.path.exists(path):
        return True
    old = comparison.read_json_object(path, f"delete it only if every run under {workdir}/runs "
                                            f"was made with {teacher.source}")
    if {k: v for k, v in old.items() if k != "source"} == teacher.identity:
        return False
    made = _runs_made(workdir)
    if not made:
        return True  # recorded by a start that made no run: nothing to mix
    now = {"source": teacher.source, **teacher.identity}
    raise InputError(f"teacher {teacher.source} is not the teacher this comparison was started "
                     f"with ({_describe(old)} from {old.get('source')!r}, in {path}; now "
                     f"{_describe(now)}): its {len(made)} run(s) would mix two teachers; use a "
                     f"new --workdir, or delete {workdir}/runs and {path} to redo them all with "
                     "this one")


def record_identity(workdir: str, teacher: Teacher) -> None:
    """Keep the teacher's identity in `workdir/teacher.json` (atomically, lead process) before
    a sub-run is made with it (`check_identity` first)."""
    if not check_identity(workdir, teacher) or not sharding.is_lead_process():
        return
    path = os.path.join(workdir, IDENTITY)
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"source": teacher.source, **teacher.identity}, f, indent=1)
    os.replace(path + ".tmp", path)


def train_teacher_stage(config, workdir: str) -> str:
    """The quick configs' first stage: a supervised teacher on balanced data of the same kind
    (synthetic: imbalance 1, `teacher_stage.num_train` images; other data: the full training
    split, without the student's `data.train_imbalance` subsample), trained by the kit into
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
    if "train_imbalance" in c.data:  # the full training split, not the student's long tail
        c.data.train_imbalance = 1.0
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
