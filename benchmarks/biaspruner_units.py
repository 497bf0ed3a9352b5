r"""Does the bias score find the units that carry the shortcut (issue 23)? On task 0 of a
BiasPruner sequence: train the biased (GCE) model exactly as BiasPruner's phase 1 does
(`subnetworks.biased_phase`), find the shortcut units (pooled activation separating the two
attribute values, red / green, at fixed class on the unbiased test images: `units.separation`),
and report per layer where they rank under every bias-score variant, under magnitude (filter L1)
and under random; each score's distribution per layer (does the global cut take whole layers?);
the fraction of each ranking's pruned set that are shortcut units (`units.analyse`).

    python benchmarks/biaspruner_units.py --config=configs/biaspruner/benchmark.py \
        --seeds=0,1,2,3,4 --out=bench_out/biaspruner_units_benchmark.json
    python benchmarks/biaspruner_units.py --config=configs/biaspruner/patch.py \
        --seeds=0,1,2,3,4 --out=bench_out/biaspruner_units_patch.json

Prints one table per seed and a summary (mean +- SE over seeds of each ranking's precision and
recall), and writes everything to --out as JSON. Also reported: how the GCE model splits the
training images (against the true `aligned` attribute) and its accuracy on the aligned and the
conflicting test images (a model that does not use the shortcut has no shortcut units to find).
`--config=configs/biaspruner/quick.py:tiny` runs in seconds (a smoke run).
Runtime and result on the two sequences: not yet measured.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import device_name, print_table, write_json  # noqa: E402
from jaxmed.methods import biaspruner  # noqa: E402
from jaxmed.methods.biaspruner import frame, subnetworks, units  # noqa: E402
from jaxmed.methods.biaspruner.tasks import build_tasks  # noqa: E402


def load_config(spec: str):
    """`path.py[:arg]` -> its get_config(arg), loaded by path as `jaxmed --config` does."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec!r}: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location("biaspruner_units_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def _acts(out: dict) -> dict:
    return {k[len("act/"):]: v for k, v in out.items() if k.startswith("act/")}


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def analyse_seed(seq: frame.TaskSequence, workdir: str, threshold: float, gamma: float) -> dict:
    """The unit report of task 0's GCE model under `seq.config.seed`."""
    cfg = seq.config
    setup, state = subnetworks.init(seq, "bias")
    s = jax.device_get(state)
    params, stats = subnetworks.biased_phase(seq, setup, s, 0, workdir)
    keys = ("index", "label", "attrs")
    task = seq.tasks[0]
    train = subnetworks.unit_pass(seq, setup, params, stats, 0, s.cmask, task.splits["train"],
                                  keys)
    test = subnetworks.unit_pass(seq, setup, params, stats, 0, s.cmask, task.splits["test"],
                                 keys)
    attr = cfg.continual.sensitive_attr
    sep = units.separation(_acts(test), test["attrs"][attr], test["label"])
    ranks = units.rankings(_acts(train), train["correct"], train["label"], params["backbone"],
                           seed=int(cfg.seed))
    report = units.analyse(ranks, units.shortcut_units(sep, threshold), gamma, sep=sep)
    found = ~np.asarray(train["correct"], bool)  # the GCE model's bias-conflicting samples
    true = np.asarray(train["attrs"]["aligned"]) == 0
    test_aligned = np.asarray(test["attrs"]["aligned"]) == 1
    test_right = np.asarray(test["correct"], bool)
    report.update(
        seed=int(cfg.seed), threshold=threshold,
        gce_split={"aligned": int((~found).sum()), "conflicting": int(found.sum()),
                   "conflicting_recall": _mean(found[true]),
                   "conflicting_precision": _mean(true[found])},
        gce_test_acc={"aligned": _mean(test_right[test_aligned]),
                      "conflicting": _mean(test_right[~test_aligned])})
    return report


def summarize(reports: list[dict]) -> list[dict]:
    """Per ranking, mean +- SE over seeds of precision and recall, beside chance."""
    rows = []
    for name in reports[0]["rankings"]:
        row = {"ranking": name, "seeds": len(reports)}
        for k in ("precision", "recall"):
            v = np.array([r["rankings"][name][k] for r in reports], np.float64)
            row[k] = float(np.nanmean(v))
            row[f"{k}_se"] = (float(np.nanstd(v, ddof=1) / np.sqrt(np.isfinite(v).sum()))
                              if np.isfinite(v).sum() > 1 else float("nan"))
        row["chance"] = float(np.mean([r["chance"] for r in reports]))
        row["layers_emptied_by_raw_cut"] = sorted({k for r in reports
                                                   for k in r["rankings"][name][
                                                       "emptied_by_raw_cut"]})
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="path.py[:arg] of a synthetic BiasPruner "
                   "config (its attribute must be known on the test images)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (config.seed each)")
    p.add_argument("--threshold", type=float, default=units.DEFAULT_THRESHOLD,
                   help="separation a shortcut unit reaches at least")
    p.add_argument("--gamma", type=float, default=None,
                   help="fraction pruned (default: the config's continual.gamma)")
    p.add_argument("--workdir", default=None, help="for the GCE phases' checkpoints (default: "
                   "a temporary folder, removed afterwards)")
    p.add_argument("--out", default="bench_out/biaspruner_units.json")
    args = p.parse_args(argv)
    config = load_config(args.config)
    biaspruner.check_config(config)
    if not config.continual.sensitive_attr:
        raise ValueError(f"--config={args.config!r}: config.continual.sensitive_attr is '': "
                         "the shortcut units need the attribute on the test images")
    gamma = float(config.continual.gamma if args.gamma is None else args.gamma)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    workdir = args.workdir or tempfile.mkdtemp(prefix="biaspruner_units_")
    t0 = time.perf_counter()
    tasks, info = build_tasks(config)
    base = frame.TaskSequence(config, tasks, info)
    reports = []
    try:
        for seed in seeds:
            cfg = copy.deepcopy(config)
            cfg.seed = seed
            r = analyse_seed(base.with_config(cfg), os.path.join(workdir, f"seed_{seed}"),
                             args.threshold, gamma)
            reports.append(r)
            print(f"\nseed {seed}: GCE split {r['gce_split']}; GCE test accuracy "
                  f"{r['gce_test_acc']}; {r['shortcut_units']} of {r['units']} units are "
                  f"shortcut units (separation >= {args.threshold})")
            print_table(units.table_rows(r), ["ranking", "layer", "pruned", "raw_pruned",
                                              "shortcut", "shortcut_pruned",
                                              "shortcut_position", "score_median",
                                              "score_iqr", "precision", "recall", "chance"])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(reports)
    print(f"\nsummary over seeds {seeds} (gamma {gamma}): the fraction of the pruned units that "
          "are shortcut units (precision) and of the shortcut units pruned (recall)")
    print_table(summary, ["ranking", "seeds", "precision", "precision_se", "recall",
                          "recall_se", "chance", "layers_emptied_by_raw_cut"])
    payload = {"config": args.config, "device": device_name(), "seeds": seeds, "gamma": gamma,
               "threshold": args.threshold, "wall_s": time.perf_counter() - t0,
               "summary": summary, "reports": reports}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
