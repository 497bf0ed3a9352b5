"""Step time of every semi-supervised algorithm relative to supervised-only at the same labeled
batch, k-means' share of TEAR's step, the cost of replicated per-sample memories, and the
strong view's augmentation on the host (PIL, per image) against the device (jnp, batched).

    python benchmarks/tear_step.py [--batch 16] [--mu 7] [--size 32] [--width 16] [--quick]

Prints a table and writes benchmarks/results/<cpu|gpu>/tear_step.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import device_name, print_table, time_call, write_json  # noqa: E402
from jaxmed.data.pipeline import Preprocess  # noqa: E402
from jaxmed.methods.tear import algorithms  # noqa: E402
from jaxmed.methods.tear.device_augment import strong_augment  # noqa: E402
from jaxmed.methods.tear.prototypes import kmeans, l2_normalize  # noqa: E402
from jaxmed.methods.tear.step import Hyper, create_ssl_state, init_memory, make_ssl_step  # noqa
from jaxmed.models import create_model  # noqa: E402
from jaxmed.train import sharding, steps  # noqa: E402
from jaxmed.train.state import TrainState  # noqa: E402

C = 7


def batch(b, mu, size, slots, seed=0):
    rng = np.random.default_rng(seed)
    img = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # noqa: E731
    lab = {"image": img(b), "label": (np.arange(b) % C).astype(np.int32),
           "index": np.arange(b, dtype=np.int32), "valid": np.ones(b, bool)}
    n = mu * b
    return {"labeled": lab, "unlabeled": {
        "weak": img(n), "strong": img(n), "valid": np.ones(n, bool),
        "index": rng.choice(np.arange(b, slots), n, replace=False).astype(np.int32)}}


def step_time(name, args, slots, mesh, repeats):
    model = create_model("resnet8", C, width=args.width)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, args.size, args.size, 3)))
    tx = optax.adam(1e-3)
    base = TrainState.create(variables, tx, jax.random.PRNGKey(1))
    hp = Hyper(num_classes=C, total_steps=1000)
    alg = algorithms.get(name)
    _, feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, args.size, args.size, 3)),
                                                    features=True), variables)
    mem = init_memory(alg, hp, params=base.params, batch_stats=base.batch_stats,
                      num_slots=slots, num_unlabeled=slots - args.batch,
                      feature_dim=int(feats.shape[-1]))
    state = jax.device_put(create_ssl_state(base, mem, slots), sharding.replicated(mesh))
    jitted = steps.jit_train_step(make_ssl_step(model, tx, alg, hp), mesh)
    b = batch(args.batch, args.mu, args.size, slots)
    if not alg.unlabeled:
        b = {"labeled": b["labeled"]}
    b = jax.device_put(b, sharding.data_sharding(mesh))
    holder = {"s": state}

    def run():
        holder["s"], m = jitted(holder["s"], b)
        return m["loss"]
    return time_call(run, warmup=2, repeats=repeats, sync=jax.block_until_ready)["median_s"], \
        int(feats.shape[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="fewer algorithms and repeats")
    args = p.parse_args()
    mesh = sharding.make_mesh()
    names = (("supervised", "fixmatch", "tear") if args.quick else algorithms.NAMES)
    repeats = 3 if args.quick else args.repeats
    rows, feat_dim = [], 0
    for name in names:
        t, feat_dim = step_time(name, args, 4096, mesh, repeats)
        rows.append({"algorithm": name, "step_ms": 1e3 * t})
    sup = next(r["step_ms"] for r in rows if r["algorithm"] == "supervised")
    for r in rows:
        r["x_supervised"] = r["step_ms"] / sup

    # k-means (3 Lloyd steps on the mu B unlabeled features) alone, against TEAR's step
    n = args.mu * args.batch
    f = l2_normalize(jax.random.normal(jax.random.PRNGKey(0), (n, feat_dim)))
    c0 = f[:C]
    km = jax.jit(lambda f, c: kmeans(f, c, None, 3)[0])
    t_km = time_call(lambda: km(f, c0), repeats=max(repeats, 5),
                     sync=jax.block_until_ready)["median_s"]
    tear_ms = next((r["step_ms"] for r in rows if r["algorithm"] == "tear"), float("nan"))
    extra = {"kmeans_ms": 1e3 * t_km, "kmeans_share_of_tear_step": 1e3 * t_km / tear_ms}

    # replicated memories: FlexMatch step with 1e3 vs 1e6 slots
    for slots in (1024, 1 << 20):
        extra[f"flexmatch_ms_slots_{slots}"] = 1e3 * step_time("flexmatch", args, slots, mesh,
                                                               repeats)[0]

    # strong view: host PIL chain per image (as grain workers run it) vs device, batched
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    host = Preprocess(args.size, 3, "translate(4)|flip|randaugment(2,10)|cutout(16)", 0)
    t_host = time_call(lambda: [host(i, {"image": im, "label": 0, "index": i})
                                for i, im in enumerate(imgs)], repeats=3)["median_s"]
    dev = jax.jit(lambda k, x: strong_augment(k, x, cutout=16))
    t_dev = time_call(lambda: dev(jax.random.PRNGKey(0), imgs), repeats=5,
                      sync=jax.block_until_ready)["median_s"]
    extra.update(strong_host_ms_per_batch=1e3 * t_host, strong_device_ms_per_batch=1e3 * t_dev)

    print(f"device: {device_name()}; labeled batch {args.batch}, mu {args.mu}, {args.size} px, "
          f"ResNet-8 width {args.width}")
    print_table(rows, ["algorithm", "step_ms", "x_supervised"])
    for k, v in extra.items():
        print(f"{k}: {v:.4g}")
    kind = "cpu" if jax.default_backend() == "cpu" else "gpu"
    write_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", kind,
                            "tear_step.json"),
               {"device": device_name(), "args": vars(args), "steps": rows, **extra})


if __name__ == "__main__":
    main()
