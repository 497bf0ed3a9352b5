"""Images/s of the same supervised train step in PyTorch (the reference implementations' way):
ResNet forward + CE + backward + Adam, eager or torch.compile, fp32 or bf16 autocast (AMP),
channels_last, data on device.

    python benchmarks/torch_reference/train_step.py --models resnet18,resnet50 \
        --batch-sizes 64,128 --modes eager,compile --dtypes float32,bfloat16 --size 224 \
        --out bench_out/train_step_torch.json

Uses torchvision's ResNets when torchvision is installed, else the torchvision-layout modules in
tests/torch_reference.py (identical architecture).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402


def build(name: str, classes: int = 1000) -> torch.nn.Module:
    try:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=classes)
    except ImportError:
        from tests import torch_reference as ref

        block, layers = {"resnet18": (ref.BasicBlock, (2, 2, 2, 2)),
                         "resnet50": (ref.Bottleneck, (3, 4, 6, 3))}[name]
        return ref.ResNet(block, layers, classes)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu ({os.cpu_count()} cores)"


def bench(name, batch, dtype, mode, size, steps, dev):
    torch.manual_seed(0)
    model = build(name).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    amp = dtype == "bfloat16"

    def step(images_u8, labels):
        x = ((images_u8.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if mode == "compile":
        step = torch.compile(step)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(dev),
             torch.randint(0, 1000, (batch,), generator=g).to(dev)) for _ in range(2)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(3):  # warm-up (and compilation)
        step(*data[i % 2])
    sync()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(*data[i % 2])
        loss.item()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"model": name, "mode": mode, "dtype": dtype, "batch": batch, "size": size,
            "images_per_s": batch * steps / med, "ms_per_step": 1000 * med / steps,
            "spread_ms": 1000 * (times[-1] - times[0]) / steps}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batch-sizes", default="64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="bench_out/train_step_torch.json")
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    rows = []
    for m in a.models.split(","):
        for mode in a.modes.split(","):
            for d in a.dtypes.split(","):
                for b in map(int, a.batch_sizes.split(",")):
                    rows.append(bench(m, b, d, mode, a.size, a.steps, dev))
                    print(rows[-1], flush=True)
    print(f"\nPyTorch {torch.__version__} train step on {device_name(dev)}")
    print_table(rows, ["model", "mode", "dtype", "batch", "size", "images_per_s", "ms_per_step",
                       "spread_ms"])
    write_json(a.out, {"framework": "torch", "device": device_name(dev),
                       "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
