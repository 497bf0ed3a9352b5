"""PruneCXR's sweep stage (`stages.run_sweeps`) for one model (tiny config, random init,
prune type l1, 4 sparsities in chunks of 3) on all devices, and `stages.sweep_model` on a mesh of
one device. Writes an npz for tests/test_prunecxr.py: the stage's saved predictions / labels /
index and the 1-device predictions, the dense oracle (plain model.apply on every test image),
what the stage's jitted forward was fed (device count and rows of each image shard, whether
the stacked params were replicated), and the number of device-to-host fetches.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/scripts/prunecxr_sharded_sweep.py OUT WORKDIR
"""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmed import data as data_lib  # noqa: E402
from jaxmed.data import augment  # noqa: E402
from jaxmed.data.pipeline import Preprocess  # noqa: E402
from jaxmed.methods.prunecxr import stages  # noqa: E402
from jaxmed.pruning.sweep import make_forward, scores_for  # noqa: E402
from jaxmed.train import build, sharding  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "quick", os.path.join(REPO, "configs", "prunecxr", "quick.py"))
quick = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quick)
cfg = quick.get_config("tiny")
cfg.unlock()
cfg.prunecxr.prune_types = ("l1",)
cfg.prunecxr.sparsities = (0.0, 0.3, 0.6, 0.9)
cfg.prunecxr.chunk = 3
cfg.prunecxr.sweep_batch_size = 24  # 64 test images: the last global batch is padded
cfg.lock()
ds = data_lib.build(cfg.data)
model = build.build_model(cfg.model, ds.info.num_classes)
variables = build.init_variables(model, cfg.model, jax.random.PRNGKey(0), (16, 16, 3))

fetches = []
to_host = sharding.to_host
sharding.to_host = lambda tree: fetches.append(1) or to_host(tree)  # counts fetches
fed = []


def spied_forward(*args, **kw):
    """The stage's jitted forward, recording what each call is fed."""
    forward = make_forward(*args, **kw)
    n = kw["mesh"].devices.size

    def spy(stacked, batch_stats, images):
        fed.append((len({s.device for s in images.addressable_shards}),
                    [s.data.shape[0] for s in images.addressable_shards], images.shape[0],
                    all(x.is_fully_replicated and len(x.sharding.device_set) == n
                        for x in jax.tree.leaves(stacked))))
        return forward(stacked, batch_stats, images)
    return spy


stages.make_forward = spied_forward
stages.load_model_variables = lambda *a, **k: variables  # the "trained" model
workdir = sys.argv[2]
stages.run_sweeps(cfg, workdir, ds, ["random-init model"])
out = {"devices": jax.device_count(), "fetches_stage": len(fetches),
       "preds_stage": np.load(stages.sweep_path(workdir, 0, "l1")),
       "label_stage": np.load(os.path.join(workdir, "sweep", "labels.npy")),
       "index_stage": np.load(os.path.join(workdir, "sweep", "index.npy")),
       "shard_devices": np.asarray([f[0] for f in fed]),
       "shard_rows": np.asarray([f[1] for f in fed]),
       "batch_rows": np.asarray([f[2] for f in fed]),
       "params_replicated": all(f[3] for f in fed)}

mesh = sharding.make_mesh(jax.devices()[:1])
v = sharding.replicate(variables, mesh)
batches = stages.cached_batches(ds["test"], batch_size=24, preprocess=Preprocess(16, 3, ""),
                                num_workers=0)
out["preds_1"] = stages.sweep_model(make_forward(model, multi_label=True, mesh=mesh), v,
                                    scores_for("l1", v["params"]), cfg.prunecxr.sparsities,
                                    batches, mesh, chunk=3)

test = ds["test"]
images = np.stack([Preprocess(16, 3, "")(i, test[i])["image"] for i in range(len(test))])
logits = model.apply(variables, augment.normalize(images), train=False)
out["dense"] = np.asarray(jax.nn.sigmoid(logits))
out["labels"] = np.stack([np.asarray(test[i]["label"]) for i in range(len(test))])
np.savez(sys.argv[1], **out)
