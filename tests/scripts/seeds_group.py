"""Train tiny supervised seeds as one program (`jaxmed.train.seeds.fit_seeds`) and save what
the tests compare; optionally SIGKILL itself mid-run.

    python tests/scripts/seeds_group.py OUT SEEDS [WAIT_FOR KILL_AT]

SEEDS: comma-separated (a group per ';'-separated list). Writes OUT/<group>/result.npz (every
seed's final params, flattened) and OUT/<group>/placement.json (mesh shape, the stacked
state's sharding spec). With WAIT_FOR / KILL_AT: once the checkpoint of step WAIT_FOR has
committed, SIGKILL at the fetch of batch KILL_AT (the run dies between steps, as a preempted job).
"""

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np
from flax import traverse_util

from jaxmed.train import run as run_lib
from jaxmed.train import seeds
from tests.configs import tiny


def killing(make_stream, group_dir, wait_for, kill_at):
    def make():
        stream = make_stream()
        inner = stream.iterator
        count = [0]

        class Killer:
            def __next__(self):
                count[0] += 1
                if count[0] == kill_at:
                    done = os.path.join(group_dir, "checkpoints", str(wait_for))
                    while not os.path.exists(os.path.join(done, "_CHECKPOINT_METADATA")):
                        time.sleep(0.05)
                    time.sleep(0.5)
                    os.kill(os.getpid(), signal.SIGKILL)
                return next(inner)

            def __getattr__(self, name):
                return getattr(inner, name)

        stream.iterator = Killer()
        return stream
    return make


def main(out, groups, wait_for=None, kill_at=None):
    for spec in groups.split(";"):
        ss = [int(s) for s in spec.split(",")]
        name = "seeds_" + "-".join(map(str, ss))
        runs = [run_lib.build_run(tiny.get_config(), s) for s in ss]
        gdir = os.path.join(out, name)
        if kill_at is not None:
            runs[0] = run_lib.dataclasses.replace(
                runs[0], make_stream=killing(runs[0].make_stream, gdir, wait_for, kill_at))
        placed = {}
        orig = seeds.place_stacked

        def spy(tree, mesh, orig=orig, placed=placed):
            got = orig(tree, mesh)
            if "spec" not in placed:  # the stacked state (placed first)
                x = jax.tree.leaves(got)[0]
                where: dict[int, list[int]] = {}
                for d, idx in x.sharding.devices_indices_map(x.shape).items():
                    for i in range(*idx[0].indices(x.shape[0])):
                        where.setdefault(i, []).append(d.id)
                placed.update(spec=list(x.sharding.spec), mesh=dict(mesh.shape),
                              seed_devices={str(i): sorted(v) for i, v in where.items()})
            return got
        seeds.place_stacked = spy
        results = seeds.fit_seeds(runs, [os.path.join(gdir, f"seed_{s}") for s in ss], gdir)
        seeds.place_stacked = orig
        flat = {}
        for s, (state, final) in zip(ss, results):
            p = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
            flat.update({f"{s}/{k}": np.asarray(v) for k, v in p.items()})
            flat[f"{s}/test_loss"] = np.asarray(final["loss"])
        os.makedirs(gdir, exist_ok=True)
        np.savez(os.path.join(gdir, "result.npz"), **flat)
        with open(os.path.join(gdir, "placement.json"), "w") as f:
            json.dump(placed, f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], *(int(x) for x in a[2:4]))
