"""BiasPruner's task-agnostic inference: every stored subnetwork (a channel mask, its BatchNorm
and head) runs on every test image and the lowest-entropy task's prediction wins. jaxmed runs
all subnetworks as one program (`subnetworks.predict_batch`: `vmap` or `lax.map` over the
stacked subnetworks, entropy selection in the same program); the PyTorch counterpart
keeps one masked model per task (prepared before timing, channels_last, cudnn.benchmark) and
loops over them, which is how the paper describes inference. Same weights on both sides
(converted), ResNet-18 ImageNet stem, 30% of inner channels pruned per task.

    python benchmarks/biaspruner_inference.py --tasks 2,5,10 --n-test 2048 --size 224 \
        --batch 128 --dtype bfloat16 --out bench_out/biaspruner_inference.json
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
from benchmarks.torch_reference.train_step import build as torch_build  # noqa: E402
from jaxmed.methods import biaspruner  # noqa: E402
from jaxmed.methods.biaspruner import frame, subnetworks  # noqa: E402
from jaxmed.methods.biaspruner.tasks import build_tasks  # noqa: E402
from jaxmed.models.convert import convert_state_dict  # noqa: E402
from jaxmed.pruning import structured  # noqa: E402

GAMMA = 0.3


def jax_learner(num_tasks: int, size: int, dtype: str, torch_net, task_axis: str,
                seed: int = 0):
    """(setup, Subnetworks state) with `num_tasks` stored random subnetworks over the torch
    net's weights."""
    c = biaspruner.real_data_config("synthetic", "", epochs=1)
    c.data.image_size = size
    c.data.synthetic.num_classes = 2 * num_tasks
    c.data.synthetic.num_train = c.data.synthetic.num_val = c.data.synthetic.num_test = \
        4 * num_tasks
    c.model.dtype = dtype
    c.continual.task_axis = task_axis
    c.continual.tasks = tuple((2 * t, 2 * t + 1) for t in range(num_tasks))
    tasks, info = build_tasks(c)
    setup, state = subnetworks.init(frame.TaskSequence(c, tasks, info), "bias")
    v = convert_state_dict({k: t.cpu() for k, t in torch_net.state_dict().items()}, "resnet18")
    backbone = dict(jax.device_get(v["params"]))
    backbone["fc"] = state.backbone["fc"]  # unused: heads live outside the model
    def stack(tree):
        return jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], num_tasks, 0), tree)

    rng = np.random.default_rng(seed)
    channel = {}
    for u in structured.resnet_units(backbone):
        channel.setdefault(u.block, {})[u.conv] = np.stack([
            structured.channel_masks({u.name: rng.random(u.width)}, GAMMA, prune="highest")[
                u.name] for _ in range(num_tasks)])
    state = state.replace(backbone=backbone,
                          task_bn=stack(subnetworks.subset(backbone, subnetworks.is_bn)),
                          task_stats=stack(jax.device_get(v["batch_stats"])), channel=channel,
                          stored=np.int32(num_tasks))
    return setup, jax.device_put(state)


def torch_models(net, state, dev):
    """One masked copy of the net per task (pruned channels' conv filters and BN affine zeroed,
    as jaxmed's parameter masks do), with the task's head as its fc."""
    import torch

    heads = jax.device_get(state.heads)
    units = subnetworks.units_of(jax.device_get(state.channel))
    models = []
    for t in range(int(state.stored)):
        channel = {name: m[t] for name, m in units.items()}
        m = copy.deepcopy(net)
        m.fc = torch.nn.Linear(heads["kernel"].shape[1], heads["kernel"].shape[2])
        with torch.no_grad():
            m.fc.weight.copy_(torch.from_numpy(np.array(heads["kernel"][t]).T.copy()))
            m.fc.bias.copy_(torch.from_numpy(np.array(heads["bias"][t])))
            for name, mask in channel.items():
                block, conv = name.split("/")
                layer, idx = block.split("_")
                mod = getattr(m, layer)[int(idx)]
                keep = torch.from_numpy(np.asarray(mask, np.float32))
                getattr(mod, conv).weight.mul_(keep.view(-1, 1, 1, 1))
                bn = getattr(mod, "bn" + conv[-1])
                bn.weight.mul_(keep)
                bn.bias.mul_(keep)
        models.append(m.to(dev).eval().to(memory_format=torch.channels_last))
    return models


def torch_infer(models, images_u8, batch, dtype, cmask):
    """All tasks' logits per batch, normalised-entropy task selection: (task, class) per image."""
    import torch

    dev = images_u8.device
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    cm = torch.from_numpy(cmask).to(dev)
    sel, pred = [], []
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                         enabled=dtype == "bfloat16"):
        for i in range(0, len(images_u8), batch):
            x = ((images_u8[i:i + batch].float() - mean) / std).contiguous(
                memory_format=torch.channels_last)
            logits = torch.stack([m(x).float() for m in models], 1)  # [B, T, C]
            logits = torch.where(cm[None], logits, torch.tensor(frame.NEG, device=dev))
            p = torch.softmax(logits, -1)
            ent = -(torch.where(cm[None], p * torch.log(p.clamp_min(1e-12)), 0.0)).sum(-1)
            ent = ent / torch.log(cm.sum(-1).clamp_min(2).float())[None]
            s = ent.argmin(-1)
            sel.append(s)
            pred.append(logits[torch.arange(len(s), device=dev), s].argmax(-1))
    return torch.cat(sel).cpu().numpy(), torch.cat(pred).cpu().numpy()


def jax_infer(setup, state, batches, valid):
    """Every batch through the one jitted program (all subnetworks + selection); one fetch."""
    outs = [subnetworks.predict(setup, state, {"image": b}, valid_tasks=valid) for b in batches]
    outs = jax.device_get(outs)
    return (np.concatenate([o["task"] for o in outs]), np.concatenate([o["pred"] for o in outs]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="2,5,10")
    p.add_argument("--n-test", type=int, default=2048)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--task-axes", default="vmap,map")
    p.add_argument("--out", default="bench_out/biaspruner_inference.json")
    a = p.parse_args()
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = torch_build("resnet18").eval()
    with torch.no_grad():  # non-trivial BN statistics, so masking BN matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    images = np.random.default_rng(0).integers(0, 256, (a.n_test, a.size, a.size, 3),
                                               dtype=np.uint8)
    images_t = torch.from_numpy(images.transpose(0, 3, 1, 2)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for num_tasks in (int(t) for t in a.tasks.split(",")):
        batches = [jax.device_put(images[i:i + a.batch]) for i in range(0, a.n_test, a.batch)]
        found = {}
        for axis in a.task_axes.split(","):
            setup, state = jax_learner(num_tasks, a.size, a.dtype, net, axis)
            cmask = np.asarray(state.cmask)
            valid = jnp.ones(num_tasks, bool)
            programs = subnetworks.predict_batch._cache_size()
            jax_infer(setup, state, batches, valid)  # compile
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                found[axis] = jax_infer(setup, state, batches, valid)
                times.append(time.perf_counter() - t0)
            rows.append({"tasks": num_tasks, "impl": f"jaxmed ({axis} over tasks)",
                         "seconds": float(np.median(times)),
                         "compiles": subnetworks.predict_batch._cache_size() - programs})
            print(rows[-1], flush=True)

        models = torch_models(net, state, dev)
        torch_infer(models, images_t[: a.batch], a.batch, a.dtype, cmask)  # cudnn autotune
        times = []
        for _ in range(a.repeats):
            sync()
            t0 = time.perf_counter()
            r_sel, r_pred = torch_infer(models, images_t, a.batch, a.dtype, cmask)
            sync()
            times.append(time.perf_counter() - t0)
        t_torch = float(np.median(times))
        del models
        rows.append({"tasks": num_tasks, "impl": "PyTorch (loop over masked models)",
                     "seconds": t_torch})
        for r in rows[-len(found) - 1:]:
            r["img_per_s"] = a.n_test / r["seconds"]
            r["speedup_vs_torch"] = t_torch / r["seconds"]
        for r, (j_sel, j_pred) in zip(rows[-len(found) - 1:], found.values()):
            r["same_task_selected"] = float(np.mean(j_sel == r_sel))
            r["same_prediction"] = float(np.mean((j_sel == r_sel) & (j_pred == r_pred)))
        print(rows[-1], flush=True)
    print(f"\nBiasPruner task-agnostic inference: ResNet-18, {a.n_test} images at {a.size} px, "
          f"batch {a.batch}, {a.dtype}, {GAMMA:.0%} inner channels pruned per task, on "
          f"{device_name()}")
    print_table(rows, ["tasks", "impl", "seconds", "img_per_s", "speedup_vs_torch",
                       "same_task_selected", "same_prediction", "compiles"])
    write_json(a.out, {"device": device_name(), "n_test": a.n_test, "size": a.size,
                       "batch": a.batch, "dtype": a.dtype, "gamma": GAMMA, "rows": rows})


if __name__ == "__main__":
    main()
