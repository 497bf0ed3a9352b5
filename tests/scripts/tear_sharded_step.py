"""One TEAR step (and one FlexMatch step) on 8 devices equals the same step on 1 device:
params, BN statistics and every per-sample memory. Run with 8 host devices; prints OK.

    python tests/scripts/tear_sharded_step.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.scripts.tear_common import fake_batch, make_state_and_step  # noqa: E402
from jaxmed.train import sharding, steps  # noqa: E402

assert jax.device_count() == 8, jax.device_count()
for name in ("tear", "flexmatch"):
    outs = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        state, step = make_state_and_step(name)
        state = jax.device_put(state, sharding.replicated(mesh))
        jitted = steps.jit_train_step(step, mesh)
        for k in range(2):
            batch = jax.device_put(fake_batch(seed=k), sharding.data_sharding(mesh))
            state, metrics = jitted(state, batch)
        outs.append((jax.device_get(state), jax.device_get(metrics)))
    (a, ma), (b, mb) = outs
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=2e-4, atol=2e-5, err_msg=name)
    for key in ma:
        np.testing.assert_allclose(ma[key], mb[key], rtol=2e-4, atol=2e-5, err_msg=key)
    assert int(a.step) == 2
print("OK")
