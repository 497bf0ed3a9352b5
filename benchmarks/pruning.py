"""Pruning throughput, jaxmed vs the PyTorch way, on one device:

  1. masks of ResNet-50 (25.5M prunable weights) at 20 sparsity levels: jaxmed's one-sort jitted
     `magnitude_masks` vs a loop of `torch.nn.utils.prune.global_unstructured(L1Unstructured)`
     on fresh copies of the model (what the PruneCXR reference does per level);
  2. masked vs dense train step (ResNet-18/50): the cost of training with masks;
  3. compacted vs masked inference at 50% channel sparsity (ResNet-18/50).

    python benchmarks/pruning.py --size 224 --batch 64 --dtype bfloat16 --out bench_out/pruning.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import device_name, print_table, time_call, write_json  # noqa: E402
from benchmarks.train_step import bench as train_bench  # noqa: E402
from jaxmed.models import create_model  # noqa: E402
from jaxmed.models.convert import convert_state_dict  # noqa: E402
from jaxmed.pruning import criteria, masks as M, structured as S  # noqa: E402

LEVELS = [round(0.05 * i, 2) for i in range(20)]  # 0, 0.05, ..., 0.95


def torch_resnet50():
    import torch

    torch.manual_seed(0)
    try:
        import torchvision
        return torchvision.models.resnet50()
    except ImportError:
        from tests import torch_reference as ref
        return ref.ResNet(ref.Bottleneck, (3, 4, 6, 3), 1000)


def mask_sweep(repeats: int) -> list[dict]:
    import torch
    from torch.nn.utils import prune

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = torch_resnet50().to(dev).eval()
    params = convert_state_dict({k: v.cpu() for k, v in net.state_dict().items()},
                                "resnet50")["params"]
    params = jax.device_put(params)
    n = criteria.num_scored(criteria.select(params))

    def ours():
        return criteria.magnitude_masks(params, LEVELS)
    t_jax = time_call(ours, warmup=1, repeats=repeats, sync=jax.block_until_ready)
    jax_kept = [M.count(m)[0] for m in jax.device_get(ours())]

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    totals, prune_only, torch_kept = [], [], []
    for r in range(max(1, repeats // 2)):
        t0, only = time.perf_counter(), 0.0
        for level in LEVELS:
            model = copy.deepcopy(net)
            mods = [(m, "weight") for m in model.modules()
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            sync()
            t1 = time.perf_counter()
            prune.global_unstructured(mods, pruning_method=prune.L1Unstructured, amount=level)
            sync()
            only += time.perf_counter() - t1
            if r == 0:
                torch_kept.append(int(sum(m.weight_mask.sum().item() for m, _ in mods)))
        totals.append(time.perf_counter() - t0)
        prune_only.append(only)
    assert jax_kept == torch_kept, "mask sizes differ from torch's"
    return [{"task": "20-level global L1 masks, ResNet-50", "weights": n,
             "jaxmed_s": t_jax["median_s"], "torch_loop_s": float(np.median(totals)),
             "torch_prune_only_s": float(np.median(prune_only)),
             "speedup": float(np.median(totals)) / t_jax["median_s"],
             "speedup_vs_prune_only": float(np.median(prune_only)) / t_jax["median_s"],
             "masks_equal_size": True}]


def masked_vs_dense(models, batch, size, dtype, steps) -> list[dict]:
    rows = []
    for m in models:
        dense = train_bench(m, batch, dtype, size, steps)
        masked = train_bench(m, batch, dtype, size, steps, sparsity=0.5)
        rows.append({"task": f"train step {m} b{batch} {dtype}", "dense_ms": dense["ms_per_step"],
                     "masked_ms": masked["ms_per_step"],
                     "ratio": masked["ms_per_step"] / dense["ms_per_step"],
                     "spread_ms": max(dense["spread_ms"], masked["spread_ms"])})
    return rows


def compacted_vs_masked(models, batch, size, dtype, repeats) -> list[dict]:
    rows = []
    for name in models:
        model = create_model(name, 1000, dtype=dtype)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)),
                        jnp.dtype(dtype))
        v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
        channel = S.channel_masks(S.filter_l1_scores(v["params"]), 0.5, scope="layer")
        pm = S.param_masks(v["params"], channel)
        fwd_masked = jax.jit(lambda v, pm, x: model.apply(
            {"params": M.apply_masks(v["params"], pm), "batch_stats": v["batch_stats"]}, x))
        small, sv = S.compact(model, jax.device_get(v), channel)
        sv = jax.device_put(sv)
        fwd_small = jax.jit(lambda v, x: small.apply(v, x))
        t_m = time_call(lambda: fwd_masked(v, pm, x), repeats=repeats, sync=jax.block_until_ready)
        t_s = time_call(lambda: fwd_small(sv, x), repeats=repeats, sync=jax.block_until_ready)
        err = float(jnp.max(jnp.abs(fwd_small(sv, x).astype(jnp.float32) -
                                    fwd_masked(v, pm, x).astype(jnp.float32))))
        shape = (size, size, 3)
        rows.append({"task": f"inference {name} b{batch} {dtype}, 50% inner channels",
                     "masked_img_s": batch / t_m["median_s"],
                     "compacted_img_s": batch / t_s["median_s"],
                     "speedup": t_m["median_s"] / t_s["median_s"],
                     "flops_ratio": S.forward_flops(small, sv, shape) /
                     S.forward_flops(model, v, shape),
                     "params_ratio": S.count_params(sv["params"]) / S.count_params(v["params"]),
                     "max_abs_diff": err})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", default="sweep,train,compact")
    p.add_argument("--out", default="bench_out/pruning.json")
    a = p.parse_args()
    models = a.models.split(",")
    out = {"device": device_name(), "jax": jax.__version__}
    parts = a.parts.split(",")
    if "sweep" in parts:
        out["sweep"] = mask_sweep(a.repeats)
        print_table(out["sweep"], ["task", "weights", "jaxmed_s", "torch_loop_s",
                                   "torch_prune_only_s", "speedup", "speedup_vs_prune_only"])
    if "train" in parts:
        out["train"] = masked_vs_dense(models, a.batch, a.size, a.dtype, a.steps)
        print_table(out["train"], ["task", "dense_ms", "masked_ms", "ratio", "spread_ms"])
    if "compact" in parts:
        out["compact"] = compacted_vs_masked(models, a.infer_batch, a.size, a.dtype, a.repeats)
        print_table(out["compact"], ["task", "masked_img_s", "compacted_img_s", "speedup",
                                     "flops_ratio", "params_ratio", "max_abs_diff"])
    print(f"device: {out['device']}")
    write_json(a.out, out)


if __name__ == "__main__":
    main()
