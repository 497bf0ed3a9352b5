"""BiasPruner's task-agnostic evaluation of two stored subnetworks (random channel masks and
per-task BatchNorm over the tiny ResNet-8) on a mesh of all devices and on a mesh of one
device. Writes an npz for tests/test_biaspruner.py: every task's selected task, prediction and
task-aware prediction on both meshes, and the sharding of what the jitted inference was fed.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/scripts/biaspruner_sharded_inference.py OUT
"""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmed.methods import biaspruner  # noqa: E402
from jaxmed.methods.biaspruner import frame, subnetworks  # noqa: E402
from jaxmed.methods.biaspruner.tasks import build_tasks  # noqa: E402
from jaxmed.pruning import structured  # noqa: E402
from jaxmed.train import sharding  # noqa: E402
from jaxmed.train.evaluate import predict  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "bp_quick", os.path.join(REPO, "configs", "biaspruner", "quick.py"))
quick = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quick)
cfg = quick.get_config("tiny")
cfg.continual.task_selection = "entropy"  # random heads: entropy picks both tasks (stem scores too)
cfg.data.synthetic_bias.shared_colours = False  # tasks differ in colour: random heads differ too
tasks, info = build_tasks(cfg)
method = biaspruner.METHODS["biaspruner"]

seq = frame.TaskSequence(cfg, tasks, info)  # all devices
setup, state = method.build(seq)
rng = np.random.default_rng(0)
channel = {u.name: np.stack([structured.channel_masks({u.name: rng.random(u.width)}, 0.3,
                                                       prune="highest")[u.name]
                             for _ in range(seq.num_tasks)])
           for u in structured.resnet_units(state.backbone)}
state = state.replace(
    channel=subnetworks._unflat(channel),
    task_bn=jax.tree.map(lambda x: x + rng.normal(0, 0.5, x.shape).astype(x.dtype),
                         state.task_bn),
    task_stats=jax.tree.map(lambda x: np.abs(x * rng.uniform(0.3, 3.0, x.shape)
                                             + rng.normal(0, 0.5, x.shape)).astype(x.dtype),
                            state.task_stats),
    heads=jax.tree.map(lambda x: rng.normal(0, 3.0, x.shape).astype(x.dtype), state.heads),
    stored=np.int32(seq.num_tasks))

out = {"devices": jax.device_count()}
for tag, devices in (("all", jax.devices()), ("one", jax.devices()[:1])):
    e = frame.TaskSequence(cfg, tasks, info, mesh=sharding.make_mesh(devices))
    s = e.replicate(state)
    for upto in range(seq.num_tasks):
        for evaluation in frame.evaluate(e, method, setup, s, upto):
            t = len([k for k in out if k.startswith(f"{tag}_aware_{upto}_")])
            out[f"{tag}_aware_{upto}_{t}"] = evaluation.aware_pred
            out[f"{tag}_acc_{upto}_{t}"] = np.array([evaluation.agnostic_acc,
                                                     evaluation.aware_acc,
                                                     evaluation.selection_acc])
    fed = []
    valid = sharding.replicate(np.ones(seq.num_tasks, bool), e.mesh)

    def recording(batch):
        fed.append(batch["image"].sharding)
        out = method.predict(setup, s, batch, valid_tasks=valid)
        out["logits"], out["stem_nll"] = subnetworks.all_logits(
            s, batch["image"], model=setup.model, task_axis=setup.task_axis, packnet=False)
        return out

    r = predict(recording, e.batches(tasks[1].splits["test"]), e.mesh)
    for k in ("task", "pred", "index", "logits", "stem_nll"):
        out[f"{tag}_{k}"] = r[k]
    out[f"{tag}_image_devices"] = np.array([len(f.device_set) for f in fed])
    out[f"{tag}_image_spec"] = np.array([str(f.spec) for f in fed])
    out[f"{tag}_state_devices"] = np.array([len(x.sharding.device_set) for x in jax.tree.leaves(s)])
    out[f"{tag}_state_replicated"] = np.array([x.sharding.is_fully_replicated
                                               for x in jax.tree.leaves(s)])
# One program per mesh, whatever the number of stored tasks.
out["compiles"] = subnetworks.predict_batch._cache_size()
out["logit_compiles"] = subnetworks.all_logits._cache_size()
np.savez(sys.argv[1], **out)
