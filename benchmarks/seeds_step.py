r"""Images/s of S seeds' train steps as one program (the seed axis, `jaxmed.train.seeds`)
against one seed's step, data on device (issue 21's GPU sweep).

    python benchmarks/seeds_step.py --seeds=1,2,4,8,16,32 --out=bench_out/seeds_step.json

Cases: the supervised step of a ResNet-18 (small stem, 64 px, batch 64; ImageNet stem, 224 px,
batch 64) and TEAR's quick FixMatch step (ResNet-8 width 8, 32 px, 16 labeled + 2 x 3 x 16
unlabeled views). Each S: S initialisations stacked, `seeds.group_step` (vmap, or
`--batching=unroll`) jitted with the state donated on the ('seed', 'data') mesh, S different
device-resident batches. `speedup` = the S seeds' images/s over one seed's, i.e. how much faster
S seeds train as one program than one after another (compile excluded; the whole-comparison
figure, compile and host work included, is benchmarks/comparison.py's).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import device_name, print_table, time_call, write_json  # noqa: E402
from jaxmed.train import run as run_lib, seeds, sharding  # noqa: E402


def supervised_case(size: int, stem: str, batch: int, dtype: str):
    from configs import quickstart

    c = quickstart.get_config()
    c.data.image_size, c.model.stem, c.model.width = size, stem, 0
    c.data.synthetic.num_train = batch * 2
    c.train.batch_size, c.model.dtype = batch, dtype
    return lambda s: run_lib.build_run(c, s), batch


def tear_case(dtype: str):
    from configs.tear import quick
    from jaxmed.methods.tear import run as tear_run

    c = quick.get_config()
    c.model.dtype = dtype
    b = c.train.batch_size
    return lambda s: tear_run.build_ssl_run(c, "fixmatch", s), b * (1 + 2 * c.ssl.mu)


def measure(build, images_per_step: int, num_seeds: int, batching: str, steps: int) -> dict:
    runs = [build(s) for s in range(num_seeds)]
    mesh = seeds.seed_mesh(num_seeds)
    batch = seeds.batch_to_global(seeds.stack([next(r.make_stream()) for r in runs]), mesh)
    state = seeds.place_stacked(seeds.stack([sharding.to_host(r.state) for r in runs]), mesh)
    fn = seeds.jit_group_step(seeds.group_step(runs[0].step, num_seeds, [], batching), mesh, [])
    active = np.ones(num_seeds, bool)
    box = {"state": state}

    def many():
        for _ in range(steps):
            box["state"], m = fn(box["state"], batch, active)
        return m

    t = time_call(many, warmup=1, repeats=3, sync=jax.block_until_ready)
    return {"seeds": num_seeds, "batching": batching, "mesh": dict(mesh.shape),
            "step_ms": 1e3 * t["median_s"] / steps,
            "images_per_s": num_seeds * images_per_step * steps / t["median_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,4,8,16,32")
    p.add_argument("--cases", default="r18_64,r18_224,tear")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batching", default="vmap", choices=seeds.BATCHINGS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="bench_out/seeds_step.json")
    args = p.parse_args()
    cases = {"r18_64": lambda: supervised_case(64, "small", args.batch, args.dtype),
             "r18_224": lambda: supervised_case(224, "imagenet", args.batch, args.dtype),
             "r18_16": lambda: supervised_case(16, "small", args.batch, args.dtype),  # smoke
             "tear": lambda: tear_case(args.dtype)}
    rows = []
    for name in args.cases.split(","):
        build, images = cases[name]()
        one = None
        for s in (int(x) for x in args.seeds.split(",")):
            try:
                r = measure(build, images, s, args.batching, args.steps)
            except Exception as e:  # noqa: BLE001 (out of memory at large S: recorded)
                rows.append({"case": name, "seeds": s, "error": f"{type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}"})
                print(rows[-1], flush=True)
                break
            one = one or (r["images_per_s"] if s == 1 else None)
            r.update(case=name, speedup=r["images_per_s"] / one if one else None)
            rows.append(r)
            print_table([r], ["case", "seeds", "batching", "step_ms", "images_per_s",
                              "speedup"])
    print()
    print_table([r for r in rows if "error" not in r],
                ["case", "seeds", "batching", "mesh", "step_ms", "images_per_s", "speedup"])
    write_json(args.out, {"device": device_name(), "dtype": args.dtype, "rows": rows})


if __name__ == "__main__":
    main()
