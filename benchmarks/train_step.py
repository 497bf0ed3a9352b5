"""Images/s of jaxmed's supervised train step (forward + backward + Adam), data on device.

    python benchmarks/train_step.py --models resnet18,resnet50 --batch-sizes 64,128 \
        --dtypes float32,bfloat16 --size 224 --out bench_out/train_step_jax.json

Measures the jitted `jaxmed.train.steps.make_train_step` with a donated state and a
device-resident uint8 batch (normalisation on device, as in training); the input pipeline is
measured by benchmarks/input_pipeline.py. MFU = the compiled step's FLOPs (XLA cost analysis) x
steps/s over the device's measured peak (a large matmul in the step's dtype, `--peak-size`). The PyTorch counterpart is benchmarks/torch_reference/train_step.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ml_collections  # noqa: E402

from benchmarks.common import device_name, print_table, time_call, write_json  # noqa: E402
from jaxmed.methods import supervised  # noqa: E402
from jaxmed.train import build, sharding, steps as steps_lib  # noqa: E402


def bench(model_name: str, batch: int, dtype: str, size: int, steps: int, classes: int = 1000,
          sparsity: float = 0.0):
    """Time the train step; with sparsity > 0 the state carries global magnitude masks (masked
    forward + masked_optimizer), the configuration of pruned training."""
    mesh = sharding.make_mesh()
    model_cfg = ml_collections.ConfigDict(dict(name=model_name, stem="imagenet", width=0,
                                               dtype=dtype, pretrained=""))
    model = build.build_model(model_cfg, classes)
    train_cfg = supervised.default_config().train
    train_cfg.lr = 1e-4
    tx = build.make_optimizer(train_cfg, 1000)
    variables = build.init_variables(model, model_cfg, jax.random.PRNGKey(0), (size, size, 3))
    masks = None
    if sparsity > 0:
        from jaxmed.pruning.criteria import magnitude_masks
        masks = jax.device_get(magnitude_masks(variables["params"], [sparsity])[0])
    state = build.create_state(variables, tx, jax.random.PRNGKey(1), mesh, masks=masks)
    step = steps_lib.make_train_step(model, tx, loss_name="ce", multi_label=False,
                                     compute_dtype=jnp.dtype(dtype))
    train_step = steps_lib.jit_train_step(step, mesh)
    rng = np.random.default_rng(0)
    batches = [sharding.to_global({
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, classes, batch).astype(np.int32),
        "valid": np.ones(batch, bool)}, mesh) for _ in range(2)]
    holder = {"state": state}

    def run():
        s = holder["state"]
        for i in range(steps):
            s, m = train_step(s, batches[i % 2])
        holder["state"] = s
        return m["loss"]

    t = time_call(run, warmup=1, repeats=5, sync=jax.block_until_ready)
    flops = step_flops(train_step, holder["state"], batches[0])
    return {"model": model_name, "dtype": dtype, "batch": batch, "size": size,
            "sparsity": sparsity, "gflops_per_image": flops / batch / 1e9,
            "tflops_per_s": flops * steps / t["median_s"] / 1e12,
            "images_per_s": batch * steps / t["median_s"],
            "ms_per_step": 1000 * t["median_s"] / steps,
            "spread_ms": 1000 * (t["max_s"] - t["min_s"]) / steps,
            "compiles": train_step._cache_size()}


def step_flops(jitted, *args) -> float:
    """FLOPs of one call of a jitted function (XLA's cost analysis of the compiled program)."""
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def matmul_peak(dtype: str, n: int) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on the default device."""
    x = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    t = time_call(lambda: f(x), warmup=2, repeats=5, sync=jax.block_until_ready)
    return 2 * n**3 / t["median_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batch-sizes", default="64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--peak-size", type=int, default=8192, help="matmul size for the peak")
    p.add_argument("--out", default="bench_out/train_step_jax.json")
    a = p.parse_args()
    peaks = {d: matmul_peak(d, a.peak_size) for d in a.dtypes.split(",")}
    rows = []
    for m in a.models.split(","):
        for d in a.dtypes.split(","):
            for b in map(int, a.batch_sizes.split(",")):
                rows.append(bench(m, b, d, a.size, a.steps))
                rows[-1]["peak_tflops"] = peaks[d] / 1e12
                rows[-1]["mfu"] = rows[-1]["tflops_per_s"] * 1e12 / peaks[d]
                print(rows[-1], flush=True)
    print(f"\njaxmed train step on {device_name()} (jax {jax.__version__})")
    print_table(rows, ["model", "dtype", "batch", "size", "images_per_s", "ms_per_step",
                       "spread_ms", "gflops_per_image", "mfu"])
    write_json(a.out, {"framework": "jax", "device": device_name(), "jax": jax.__version__,
                       "rows": rows})


if __name__ == "__main__":
    main()
