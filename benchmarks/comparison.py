r"""Seeds in parallel vs one after another (issue 21): wall time and images/s of one method's
S seeds trained as one program (`config.<section>.parallel_seeds=True`, jaxmed.train.seeds;
on a one-device CPU forced with JAXMED_SEEDS_ON_CPU=unroll, which this script sets) against the
same S seeds run one after another (`False`), each a fresh
`python -m jaxmed.main` comparison in an empty workdir (so both pay what a user pays: imports,
data, compiles — main's persistent XLA cache lets sequential seeds after the first reuse the
first seed's programs —, evaluation, checkpoints, the report).

    python benchmarks/comparison.py --seeds=1,2,4,8 --steps=100 \
        --out=bench_out/comparison_cpu.json

Families (the quick configs, one method each, `--steps` training steps instead of the
config's own so that S = 8 sequential fits the CPU): TEAR quick with FixMatch (B 16 labeled +
2 x mu 3 x 16 unlabeled views per step), FoPro-KD quick with EKD (B 32; its teacher stage is
trained once beforehand and passed as `kd.teacher`, so that neither side pays for it). HTL,
BiasPruner and PruneCXR have no seed axis yet (their runs act on each seed's state between
steps), so their ratio is 1 by construction and they are not timed. Prints one table (ratio
= sequential / parallel wall time) and writes everything to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import device_name, print_table, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {
    # name: (config, section, method, images per step of one seed)
    "tear": ("configs/tear/quick.py", "ssl", "fixmatch", 16 * (1 + 2 * 3)),
    "fopro_kd": ("configs/fopro_kd/quick.py", "kd", "ekd", 32),
}


def teacher_for(config_path: str, root: str) -> str:
    """The FoPro-KD quick config's teacher stage, trained once into root/teacher_stage."""
    sys.path.insert(0, REPO)
    import importlib.util

    from jaxmed.methods.fopro_kd import teachers

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, config_path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return teachers.train_teacher_stage(mod.get_config(), os.path.join(root, "teacher_stage"))


def one(family: str, seeds: int, parallel: bool, steps: int, root: str, extra: list[str]
        ) -> dict:
    cfg, section, method, images = FAMILIES[family]
    workdir = os.path.join(root, f"{family}_{seeds}_{'par' if parallel else 'seq'}")
    shutil.rmtree(workdir, ignore_errors=True)
    seed_tuple = "(" + ",".join(str(s) for s in range(seeds)) + ("," if seeds == 1 else "") + ")"
    cmd = [sys.executable, "-m", "jaxmed.main", f"--config={cfg}", f"--workdir={workdir}",
           f"--config.{section}.methods=('{method}',)", f"--config.{section}.seeds={seed_tuple}",
           f"--config.{section}.parallel_seeds={parallel}", f"--config.train.steps={steps}",
           "--config.train.progress=False", *extra]
    env = dict(os.environ)
    if parallel:  # a one-device CPU trains seeds one after another unless asked (seeds.py)
        env.setdefault("JAXMED_SEEDS_ON_CPU", "unroll")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    together = f"{seeds} seeds as one program (" in proc.stdout
    if parallel and seeds > 1 and not together:
        raise RuntimeError(f"{family}: parallel_seeds=True did not train the seeds together")
    return {"family": family, "method": method, "seeds": seeds,
            "mode": "parallel" if parallel else "sequential", "wall_s": wall,
            "images_per_s": seeds * steps * images / wall, "steps": steps}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", default="bench_out/comparison_cpu.json")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="jaxmed_bench_comparison_")
    rows, table = [], []
    try:
        for family in args.families.split(","):
            extra = []
            if family == "fopro_kd":
                extra = [f"--config.kd.teacher={teacher_for(FAMILIES[family][0], root)}"]
            for s in (int(x) for x in args.seeds.split(",")):
                seq = one(family, s, False, args.steps, root, extra)
                par = one(family, s, True, args.steps, root, extra)
                rows += [seq, par]
                table.append({"family": family, "method": seq["method"], "S": s,
                              "sequential_s": seq["wall_s"], "parallel_s": par["wall_s"],
                              "ratio": seq["wall_s"] / par["wall_s"],
                              "img/s seq": seq["images_per_s"], "img/s par": par["images_per_s"]})
                print_table(table[-1:], list(table[-1]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print_table(table, list(table[0]))
    write_json(args.out, {"device": device_name(), "steps": args.steps, "rows": rows,
                          "table": table})


if __name__ == "__main__":
    main()
