"""Comparison runs: every method of `config.<method>.methods` x every seed of
`config.<method>.seeds` on the same data, each in its own sub-workdir, then one table.

A finished (method, seed) run leaves `result.json`; a rerun of the comparison skips it, so a
crash or a kill costs at most the run in progress (which resumes from its own checkpoints).
`comparison.csv` has one row per method: `method`, `seeds`, the mean of each metric over the
seeds and its standard deviation (`<metric>_std`, ddof=1; 0 with one seed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxmed.report import write_csv
from jaxmed.train import sharding


def check_methods_and_seeds(methods, seeds, known: Sequence[str], key: str) -> None:
    """Tuples of known method names and of integer seeds, else an error naming the key."""
    if isinstance(methods, str) or not isinstance(methods, (tuple, list)) or not methods:
        raise ValueError(f"config.{key}.methods={methods!r} must be a non-empty tuple of "
                         f"names from {list(known)}")
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"config.{key}.methods: unknown {bad}; known: {list(known)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"config.{key}.methods={tuple(methods)!r} repeats a method")
    if isinstance(seeds, (str, int)) or not isinstance(seeds, (tuple, list)) or not seeds \
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"config.{key}.seeds={seeds!r} must be a non-empty tuple of ints")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.{key}.seeds={tuple(seeds)!r} repeats a seed")


def run_dir(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, "runs", method, f"seed_{seed}")


def run_all(workdir: str, methods: Sequence[str], seeds: Sequence[int],
            run_one: Callable[[str, int, str], Mapping[str, float]]
            ) -> dict[str, list[dict[str, float]]]:
    """{method: [result of each seed]}; `run_one(method, seed, run_workdir)` returns a flat
    dict of final metrics (floats), the same on every process. Finished runs are read back, not
    rerun. Call `write_comparison` / figures from the lead process only."""
    results: dict[str, list[dict[str, float]]] = {}
    for method in methods:
        for seed in seeds:
            d = run_dir(workdir, method, seed)
            path = os.path.join(d, "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    result = json.load(f)
            else:  # every process takes part in the run; the lead writes its result
                os.makedirs(d, exist_ok=True)
                result = {k: _to_float(v) for k, v in dict(run_one(method, seed, d)).items()}
                if sharding.is_lead_process():
                    with open(path + ".tmp", "w") as f:
                        json.dump(result, f, indent=1)
                    os.replace(path + ".tmp", path)
            results.setdefault(method, []).append(result)
    return results


def _to_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def summarize(results: Mapping[str, Sequence[Mapping[str, float]]], metrics: Sequence[str]
              ) -> dict[str, dict[str, float]]:
    """{method: {metric: mean, metric_std: sd, 'seeds': n}} over the seeds."""
    out = {}
    for method, runs in results.items():
        row: dict[str, float] = {"seeds": len(runs)}
        for m in metrics:
            vals = np.asarray([r[m] for r in runs if m in r and _finite(r[m])], np.float64)
            row[m] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[method] = row
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_comparison(path: str, results, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """comparison.csv (method, seeds, each metric and its _std); returns the summary."""
    summary = summarize(results, metrics)
    header = ["method", "seeds", *[c for m in metrics for c in (m, f"{m}_std")]]
    rows = [[method, row["seeds"], *[f"{row[c]:.6g}" for m in metrics
                                      for c in (m, f"{m}_std")]]
            for method, row in summary.items()]
    write_csv(path, header, rows)
    return summary


def beats(summary, a: str, b: str, metric: str, *, higher: bool = True) -> bool:
    """True if method `a` beats `b` on `metric` by more than the larger of their seed standard
    deviations (the report's threshold for a verdict; never drawn from one seed)."""
    ra, rb = summary[a], summary[b]
    if ra["seeds"] < 2 or rb["seeds"] < 2:
        return False
    gap = (ra[metric] - rb[metric]) * (1 if higher else -1)
    return gap > max(ra[f"{metric}_std"], rb[f"{metric}_std"])


def metric_by_method_figure(path: str, results, metric: str, *, title: str = "") -> None:
    """Each seed's value as a dot and the mean as a bar, per method."""
    from jaxmed.report import new_figure, save_figure

    methods = list(results)
    fig, ax = new_figure(figsize=(1.4 + 1.1 * len(methods), 3.6))
    for i, m in enumerate(methods):
        vals = [r[metric] for r in results[m] if _finite(r.get(metric))]
        if vals:
            ax.bar(i, np.mean(vals), color="#9ecae1", width=0.6)
            ax.scatter([i] * len(vals), vals, color="#08519c", s=14, zorder=3)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per method (dots: seeds)")
    save_figure(fig, path)
