"""HTL identification time relative to one training epoch (the cost of attending to hard
samples every K epochs is about (identification / epoch) / K of the training time).

One epoch = steps_per_epoch jitted U-Net train steps on pre-built batches (input pipeline
excluded); identification = dense + every pruning level (lax.map over the stacked masks) on
every training image in eval batches, plus the masks from one sort, fetched once. Both on the
same pre-decoded data, median of repeats after a warm-up (compiles excluded).

    python benchmarks/htl_identify.py                 # the quick config's model and sizes (CPU)
    python benchmarks/htl_identify.py --size 256 --width 64 --model unet_resnet34 \\
        --num-train 2048 --batch 16 --eval-batch 64 --out benchmarks/results/h100/htl_identify.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import device_name, print_table, time_call, write_json  # noqa: E402
from jaxmed.data.pipeline import Preprocess, eval_batches  # noqa: E402
from jaxmed.data.synthetic import SyntheticSource, SyntheticSpec  # noqa: E402
from jaxmed.methods import htl  # noqa: E402
from jaxmed.methods.htl import identify, step as htl_step  # noqa: E402
from jaxmed.models import create_model  # noqa: E402
from jaxmed.train import build, sharding, steps  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="unet_resnet18")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--stem", default="small")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--num-train", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=200)
    p.add_argument("--sparsities", default="0.3,0.5,0.7,0.9")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/cpu/htl_identify.json")
    a = p.parse_args()
    mesh = sharding.make_mesh()
    model = create_model(a.model, 1, width=a.width, stem=a.stem)
    tcfg = htl.default_config().train
    tx = build.make_optimizer(tcfg, 1000)
    v = jax.device_get(dict(jax.jit(lambda r, x: model.init(r, x))(
        jax.random.PRNGKey(0), jnp.zeros((1, a.size, a.size, 3)))))
    state = build.create_state(v, tx, jax.random.PRNGKey(1), mesh, index_bound=a.num_train)
    src = SyntheticSource(SyntheticSpec(num_samples=a.num_train, image_size=a.size,
                                        with_mask=True, hard_rate=0.08))
    pre = Preprocess(a.size, 3)
    train_batches = [sharding.to_global(b, mesh) for b in
                     eval_batches(src, global_batch=a.batch, preprocess=pre)][:a.num_train
                                                                                 // a.batch]
    eval_host = list(eval_batches(src, global_batch=a.eval_batch, preprocess=pre))
    step = steps.jit_train_step(htl_step.make_train_step(model, tx, task="segmentation"), mesh)
    sparsities = tuple(float(s) for s in a.sparsities.split(","))
    fn = identify.make_identify_fn(model, task="segmentation", mesh=mesh)
    holder = {"s": state}

    def epoch():
        s = holder["s"]
        for b in train_batches:
            s, m = step(s, b)
        holder["s"] = s
        return m["loss"]

    def ident():
        out = identify.identify_samples(fn, holder["s"].params, holder["s"].batch_stats,
                                        sparsities, iter(eval_host), mesh)
        return out["score"]

    t_epoch = time_call(epoch, warmup=1, repeats=a.repeats, sync=jax.block_until_ready)
    t_ident = time_call(ident, warmup=1, repeats=a.repeats)
    t_masks = time_call(lambda: identify.level_masks(holder["s"].params, sparsities),
                        warmup=1, repeats=a.repeats, sync=jax.block_until_ready)
    ratio = t_ident["median_s"] / t_epoch["median_s"]
    rows = [{"what": "train epoch", "seconds": t_epoch["median_s"], "per_image_ms":
             1e3 * t_epoch["median_s"] / (len(train_batches) * a.batch)},
            {"what": f"identification ({len(sparsities)} levels + dense)", "seconds":
             t_ident["median_s"], "per_image_ms": 1e3 * t_ident["median_s"] / a.num_train},
            {"what": "  of which masks (one sort)", "seconds": t_masks["median_s"]},
            {"what": "identification / epoch", "seconds": ratio}]
    print(f"{device_name()}: {a.model} width {a.width} at {a.size} px, {a.num_train} images")
    print_table(rows, ["what", "seconds", "per_image_ms"])
    write_json(a.out, {"device": device_name(), "args": vars(a), "epoch": t_epoch,
                       "identification": t_ident, "masks": t_masks,
                       "identification_over_epoch": ratio})


if __name__ == "__main__":
    main()
