"""One whole jitted train step (forward, gradients, optimizer update, BN statistics) of the tiny
model on a mesh of all devices and on a mesh of one device, for the same global batch. Writes
an npz for tests/test_train.py: the loss, the gradient norm, every updated parameter and BN
statistic on both meshes, and the shape of each device's shard of the batch.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/sharded_grads.py OUT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmed.data import build as build_data  # noqa: E402
from jaxmed.data.pipeline import Preprocess, train_stream  # noqa: E402
from jaxmed.train import build, sharding, steps  # noqa: E402
from tests.configs import tiny  # noqa: E402

cfg = tiny.get_config()
ds = build_data(cfg.data)
model = build.build_model(cfg.model, ds.info.num_classes)
variables = build.init_variables(model, cfg.model, jax.random.PRNGKey(0), (16, 16, 3))
# Plain SGD: each parameter's update is -lr x its own gradient, so every per-leaf gradient of
# the sharded step shows in the comparison (Adam's first step is ~ -lr x sign(g)).
cfg.train.optimizer, cfg.train.momentum, cfg.train.lr = "sgd", 0.0, 0.5
tx = build.make_optimizer(cfg.train, 10)
step = steps.make_train_step(model, tx, loss_name="ce", multi_label=False)
batch = next(train_stream(ds["train"], global_batch=16, seed=0, num_epochs=1,
                          preprocess=Preprocess(16, 3, "flip")))
out = {"devices": jax.device_count()}
for n in (jax.device_count(), 1):
    mesh = sharding.make_mesh(jax.devices()[:n])
    state = build.create_state(variables, tx, jax.random.PRNGKey(1), mesh)
    train_step = steps.jit_train_step(step, mesh)
    g = sharding.to_global(batch, mesh)
    tag = "8" if n > 1 else "1"
    out[f"shard_rows_{tag}"] = np.asarray([s.data.shape[0] for s in
                                          g["image"].addressable_shards])
    out[f"shard_devices_{tag}"] = len({s.device for s in g["image"].addressable_shards})
    new, metrics = train_step(state, g)
    out[f"loss_{tag}"] = np.asarray(metrics["loss"])
    out[f"grad_norm_{tag}"] = np.asarray(metrics["grad_norm"])
    old = flax.traverse_util.flatten_dict(jax.device_get(variables["params"]), sep="/")
    for k, v in flax.traverse_util.flatten_dict(jax.device_get(new.params), sep="/").items():
        out[f"p/{k}_{tag}"] = np.asarray(v)
        out[f"g/{k}_{tag}"] = (old[k] - np.asarray(v)) / cfg.train.lr  # the gradient used
    for k, v in flax.traverse_util.flatten_dict(jax.device_get(new.batch_stats),
                                                sep="/").items():
        out[f"p/bn/{k}_{tag}"] = np.asarray(v)
np.savez(sys.argv[1], **out)
