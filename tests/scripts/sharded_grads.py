"""Loss and gradients of one training step of the tiny model on a mesh of all devices and on a
mesh of one device, for the same global batch. Writes an npz for tests/test_train.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/sharded_grads.py OUT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmed.data import build  # noqa: E402
from jaxmed.data.pipeline import Preprocess, train_stream  # noqa: E402
from jaxmed.methods import supervised  # noqa: E402
from jaxmed.train import sharding  # noqa: E402
from tests.configs import tiny  # noqa: E402

cfg = tiny.get_config()
ds = build(cfg.data)
model = supervised.build_model(cfg.model, ds.info.num_classes)
variables = supervised.init_variables(model, cfg.model, jax.random.PRNGKey(0), (16, 16, 3))
loss_fn = supervised.make_loss_fn(model, loss_name="ce", multi_label=False)
batch = next(train_stream(ds["train"], global_batch=16, seed=0, num_epochs=1,
                          preprocess=Preprocess(16, 3, "flip")))
out = {"devices": jax.device_count()}
for n in (jax.device_count(), 1):
    mesh = sharding.make_mesh(jax.devices()[:n])
    rep = sharding.replicated(mesh)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                      in_shardings=(rep, rep, None, sharding.data_sharding(mesh), None),
                      out_shardings=rep)
    (loss, (_, stats)), grads = grad_fn(variables["params"], variables["batch_stats"], None,
                                        sharding.to_global(batch, mesh), jax.random.PRNGKey(1))
    tag = "8" if n > 1 else "1"
    out[f"loss_{tag}"] = np.asarray(loss)
    for k, v in flax.traverse_util.flatten_dict(jax.device_get(grads), sep="/").items():
        out[f"g/{k}_{tag}"] = np.asarray(v)
    for k, v in flax.traverse_util.flatten_dict(jax.device_get(stats), sep="/").items():
        out[f"g/bn/{k}_{tag}"] = np.asarray(v)
np.savez(sys.argv[1], **out)
