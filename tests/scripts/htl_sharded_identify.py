"""HTL identification (`identify.identify_samples`) on the planted set over every device (8 fake
CPU devices), batches of 16 sharded on `data`; prints JSON: the HTL indices, the sorted index,
the device count and the sharding of the per-sample outputs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/htl_sharded_identify.py
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxmed.data.pipeline import Preprocess, eval_batches  # noqa: E402
from jaxmed.data.sources import ArraySource  # noqa: E402
from jaxmed.methods.htl import identify  # noqa: E402
from jaxmed.train import sharding  # noqa: E402
from tests import htl_planted as P  # noqa: E402

mesh = sharding.make_mesh()
images, y = P.planted_images()
source = ArraySource(images, y)
pre = Preprocess(None, 1)
fn = identify.make_identify_fn(P.PixelLinear(), task="classification", mesh=mesh)
params = sharding.replicate(P.params(), mesh)
out = identify.identify_samples(fn, params, {}, P.SPARSITIES,
                                eval_batches(source, global_batch=16, preprocess=pre), mesh)
g = sharding.to_global(next(eval_batches(source, global_batch=16, preprocess=pre)), mesh)
res = fn(params, identify.level_masks(params, P.SPARSITIES), {}, g)
print(json.dumps({"htl": np.flatnonzero(out["htl"]).tolist(), "index": out["index"].tolist(),
                  "devices": jax.device_count(),
                  "shards": len(res["score"].sharding.device_set)}))
