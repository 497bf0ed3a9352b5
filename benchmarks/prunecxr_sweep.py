"""PruneCXR's stage 2 for one ResNet-50 run: test-set predictions at 20 sparsities, jaxmed vs the
reference protocol in PyTorch (per level: a fresh copy of the model,
`prune.global_unstructured(L1Unstructured)`, a full evaluation with sigmoid outputs), on the
same device and the same device-resident synthetic test set. The PyTorch side is given its
fastest evaluation (masks baked in with prune.remove, channels_last, cudnn.benchmark), faster
than the reference's forward hooks. One more row times the PruneCXR stage's own path
(`stages.sweep_model`: host batches made global and sharded over every device through
`evaluate.predict`, i.e. including the host-to-device copies of the test set per chunk).

    python benchmarks/prunecxr_sweep.py --n-test 2048 --size 256 --batch 128 \
        --out bench_out/prunecxr_sweep.json
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

from benchmarks.common import device_name, print_table, write_json  # noqa: E402
from benchmarks.pruning import LEVELS, torch_resnet50  # noqa: E402
from jaxmed.models import create_model  # noqa: E402
from jaxmed.models.convert import convert_state_dict  # noqa: E402
from jaxmed.methods.prunecxr import stages  # noqa: E402
from jaxmed.pruning.sweep import make_forward, scores_for, sweep  # noqa: E402
from jaxmed.train import sharding  # noqa: E402

CLASSES = 20


def torch_protocol(net, images_u8, batch, dtype):
    import torch
    from torch.nn.utils import prune

    dev = next(net.parameters()).device
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    out = []
    for level in LEVELS:
        model = copy.deepcopy(net).eval()
        mods = [(m, "weight") for m in model.modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        prune.global_unstructured(mods, pruning_method=prune.L1Unstructured, amount=level)
        for m, name in mods:  # bake the masks in, then channels_last: torch's fastest eval
            prune.remove(m, name)
        model = model.to(memory_format=torch.channels_last)
        preds = []
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                             enabled=dtype == "bfloat16"):
            for i in range(0, len(images_u8), batch):
                x = ((images_u8[i:i + batch].float() - mean) / std).contiguous(
                    memory_format=torch.channels_last)
                preds.append(torch.sigmoid(model(x).float()))
        out.append(torch.cat(preds).cpu().numpy())
    return np.stack(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-test", type=int, default=2048)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--level-axes", default="map,vmap")
    p.add_argument("--out", default="bench_out/prunecxr_sweep.json")
    a = p.parse_args()
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    net = torch_resnet50()
    net.fc = torch.nn.Linear(2048, CLASSES)
    net = net.to(dev).eval()
    images = np.random.default_rng(0).integers(0, 256, (a.n_test, a.size, a.size, 3),
                                               dtype=np.uint8)

    model = create_model("resnet50", CLASSES, dtype=a.dtype)
    v = jax.device_put(convert_state_dict({k: t.cpu() for k, t in net.state_dict().items()},
                                          "resnet50"))
    on_device = [jax.device_put(images[i:i + a.batch]) for i in range(0, a.n_test, a.batch)]

    def levels(fn):  # the device-resident test set; one fetch per chunk of levels
        return np.concatenate(jax.device_get([fn(x) for x in on_device]), axis=1)

    rows, preds = [], {}
    for axis in a.level_axes.split(","):
        fwd = make_forward(model, multi_label=True, compute_dtype=jnp.dtype(a.dtype),
                           level_axis=axis)
        scores = scores_for("l1", v["params"])
        run = lambda: sweep(fwd, v, scores, LEVELS, levels, chunk=a.chunk)  # noqa: E731
        run()  # compile
        t0 = time.perf_counter()
        preds[axis] = run()
        rows.append({"impl": f"jaxmed ({axis} over levels)", "seconds": time.perf_counter() - t0,
                     "compiles": fwd._cache_size()})
        print(rows[-1], flush=True)

    mesh = sharding.make_mesh()
    host = []
    for i in range(0, a.n_test, a.batch):  # global batches of a.batch rows, the last padded
        n = min(a.batch, a.n_test - i)
        host.append({"image": np.pad(images[i:i + n], ((0, a.batch - n),) + ((0, 0),) * 3),
                     "index": np.arange(i, i + a.batch), "valid": np.arange(a.batch) < n})
    fwd = make_forward(model, multi_label=True, compute_dtype=jnp.dtype(a.dtype), mesh=mesh)
    vr = sharding.replicate(jax.device_get(v), mesh)
    scores = scores_for("l1", vr["params"])
    run = lambda: stages.sweep_model(fwd, vr, scores, LEVELS, lambda: host, mesh,  # noqa: E731
                                     chunk=a.chunk)
    run()  # compile
    t0 = time.perf_counter()
    preds["stage"] = run()
    rows.append({"impl": f"jaxmed stage path (host batches over {mesh.devices.size} devices, "
                         "map)", "seconds": time.perf_counter() - t0,
                 "compiles": fwd._cache_size()})
    print(rows[-1], flush=True)

    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2)).to(dev)
    torch_protocol(net, images_t[: a.batch], a.batch, a.dtype)  # warm-up (cudnn autotune)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ref = torch_protocol(net, images_t, a.batch, a.dtype)
    sync()
    rows.append({"impl": "PyTorch reference protocol", "seconds": time.perf_counter() - t0,
                 "compiles": None})
    base = rows[-1]["seconds"]
    for r in rows:
        r["speedup_vs_torch"] = base / r["seconds"]
    for axis, pr in preds.items():
        err = float(np.abs(pr - ref).max())
        next(r for r in rows if axis in r["impl"])["max_abs_diff_vs_torch"] = err
    print(f"\nPruneCXR sweep: ResNet-50, {a.n_test} test images at {a.size} px, 20 sparsities, "
          f"{a.dtype}, on {device_name()}")
    print_table(rows, ["impl", "seconds", "speedup_vs_torch", "max_abs_diff_vs_torch",
                       "compiles"])
    write_json(a.out, {"device": device_name(), "n_test": a.n_test, "size": a.size,
                       "batch": a.batch, "dtype": a.dtype, "rows": rows})


if __name__ == "__main__":
    main()
