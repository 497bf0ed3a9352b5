"""The comparison engine every method uses: every method of `config.<section>.methods` x every
seed of `config.<section>.seeds` on the same data, each in its own sub-workdir, then one table.

Layout: `workdir/runs/<method>/seed_<s>/`, each with its own `config.json` (the comparison's,
with methods = (method,), seeds = (s,), seed = s: a half-done sub-run never resumes under
another value of a key that changes results) and, once finished, one atomic `result.json`: the
only finished-run marker. A rerun skips finished sub-runs, so a crash or a kill costs at most
the run in progress (which resumes from its own checkpoints). `methods` / `seeds` are harmless
on resume: a new method or seed runs only its new sub-runs, a removed one drops its row. A sub-run
never resumes, nor counts, under another value of a key that changes results: after a change
accepted with `--allow_config_change`, a sub-run made under the old config (finished or not) is
moved aside to `seed_<s>.old<k>/`, kept whole, listed in `report/superseded.csv`, and run again
under the new one, so every row of the report comes from the config the report shows.

`report/comparison.csv` has one row per method: `method`, `seeds`, the mean of each metric over
the seeds and its sample standard deviation (`<metric>_std`, ddof 1; 0 with one seed); it and
the rest of the report are written by the lead process only, each file atomically.

The one verdict rule (`verdict`): a method is better or worse than another on a metric only
when both have at least `MIN_SEEDS` finite values and the difference of the means exceeds two
standard errors of the difference, 2 sqrt(sd_a^2 / n_a + sd_b^2 / n_b); otherwise 'within
noise' (or 'too few seeds').
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from jaxmed.config_check import InputError
from jaxmed.report import write_csv
from jaxmed.train import seeds as seeds_lib
from jaxmed.train import sharding

log = logging.getLogger(__name__)

RESULT = "result.json"
MIN_SEEDS = 3
BETTER, WORSE, NOISE, FEW = "better", "worse", "within noise", "too few seeds"


def harmless_keys(section: str) -> tuple[str, ...]:
    """The comparison's own keys: which methods and seeds run, and whether seeds train
    together, never change a sub-run."""
    return (f"{section}.methods", f"{section}.seeds", f"{section}.parallel_seeds")


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


def sub_config(config, section: str, method: str, seed: int) -> ml_collections.ConfigDict:
    """The config of one (method, seed) sub-run."""
    c = ml_collections.ConfigDict(config.to_dict())
    c[section].methods, c[section].seeds = (method,), (int(seed),)
    c.seed = int(seed)
    return c


def write_result(run_workdir: str, result: Mapping) -> None:
    """`result.json`, atomically (a kill leaves the old file or none). Lead process only."""
    if not sharding.is_lead_process():
        return
    os.makedirs(run_workdir, exist_ok=True)
    path = os.path.join(run_workdir, RESULT)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(result), f, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)


def read_result(run_workdir: str) -> dict | None:
    """A finished run's `result.json`; None if it has none; a corrupt one is an error naming
    the file and what to delete."""
    path = os.path.join(run_workdir, RESULT)
    if not os.path.exists(path):
        return None
    return read_json_object(path, "delete it to rerun that run")


def read_json_object(path: str, remedy: str) -> dict:
    """A JSON object a run wrote; an unreadable or other file is an InputError naming it and
    `remedy` (what deleting it does)."""
    try:
        with open(path) as f:
            obj = json.load(f)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}): {remedy}") from None
    return obj


def _json_default(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON-serialisable")


def run_all(workdir: str, config, section: str,
            run_one: Callable[[str, int, str, ml_collections.ConfigDict], Mapping],
            *, harmless: tuple[str, ...] = (), run_group: Callable | None = None,
            why_sequential: str | Callable[[str], str] = "") -> dict[str, list[dict]]:
    """{method: [result of each seed]} for `config.<section>.methods` x `.seeds`.

    `run_one(method, seed, run_workdir, sub_config)` trains one sub-run and returns a flat dict
    of final metrics (floats; the same on every process; other JSON values are kept for the
    method's report). Finished sub-runs are read back, not rerun. With
    `config.<section>.parallel_seeds` and a `run_group` (see `_run_group`), a method's
    unfinished seeds train together (`train.seeds`) where the backend gains from it
    (`seeds.backend_reason`); otherwise (a log line says why: the backend, or
    `why_sequential` for a method without one; a function of the method's name when only some
    methods of the section have one: '' for those that do) each runs and finishes in turn."""
    from jaxmed.train.workdir import write_config

    s = config[section]
    parallel = bool(s.get("parallel_seeds", False))
    results: dict[str, list[dict]] = {}
    for method in s.methods:
        done, todo = {}, []
        for seed in s.seeds:
            d = run_dir(workdir, method, seed)
            sub = sub_config(config, section, method, seed)
            supersede_if_changed(workdir, sub, d, harmless)
            result = read_result(d)
            if result is None:
                todo.append((seed, d, sub))
            else:
                done[seed] = result
        why = why_sequential(method) if callable(why_sequential) else why_sequential
        reason = (seeds_lib.backend_reason(parallel, len(todo)) or why
                  or ("" if run_group is not None else "no seed axis for this method"))
        if not reason:
            done.update(_run_group(workdir, config, section, method, todo, run_group, harmless))
        else:
            if parallel and len(todo) > 1:
                seeds_lib.say_sequential(f"{section} {method}", len(todo), reason)
            for seed, d, sub in todo:  # every process takes part in the run; the lead writes
                write_config(sub, d, harmless=harmless)
                done[seed] = _finish(d, run_one(method, seed, d, sub))
        results[method] = [done[seed] for seed in s.seeds]
    return results


def group_dir(workdir: str, method: str, seeds: Sequence[int]) -> str:
    """Where the seeds trained together keep their stacked checkpoints and config."""
    return os.path.join(workdir, "runs", method, "seeds_" + "-".join(str(s) for s in seeds))


def _finish(d: str, result: Mapping) -> dict:
    result = {k: _to_float(v) for k, v in dict(result).items()}
    write_result(d, result)
    return result


def _run_group(workdir, config, section, method, todo, run_group, harmless) -> dict:
    """The unfinished seeds of `method` trained together (`run_group(method, seeds, run_dirs,
    sub_configs, group_dir) -> [result per seed]`): every sub-run's config.json first, the
    group's own (the seeds it holds) beside its checkpoints, each result.json after."""
    from jaxmed.train.workdir import write_config

    seeds = [t[0] for t in todo]
    g = group_dir(workdir, method, seeds)
    gsub = ml_collections.ConfigDict(todo[0][2].to_dict())
    gsub[section].seeds, gsub.seed = tuple(seeds), int(seeds[0])
    supersede_if_changed(workdir, gsub, g, harmless)
    write_config(gsub, g, harmless=harmless)
    for _, d, sub in todo:
        write_config(sub, d, harmless=harmless)
    out = run_group(method, seeds, [t[1] for t in todo], [t[2] for t in todo], g)
    if len(out) != len(todo):
        raise RuntimeError(f"{method}: run_group returned {len(out)} results for {len(todo)} "
                           "seeds")
    return {seed: _finish(d, r) for (seed, d, _), r in zip(todo, out)}


def supersede_if_changed(workdir: str, sub, d: str, harmless: tuple[str, ...]) -> None:
    """Move a sub-run made under another config aside (`<d>.old<k>`) and record it. The
    comparison's own config check has passed (or the change was accepted), so the difference is
    one the user asked for; the old sub-run is kept, never resumed or reported."""
    from jaxmed.train import workdir as workdir_lib

    changes = workdir_lib.check_config(sub, d, allow_changed=True, harmless=harmless)
    if not changes:
        return
    if sharding.is_lead_process():
        k = 1
        while os.path.exists(f"{d}.old{k}"):
            k += 1
        os.replace(d, f"{d}.old{k}")
        listing = "; ".join(f"{key}: {was!r} -> {now!r}" for key, was, now in changes)
        log.warning("%s was made under another config (%s): moved to %s.old%d, run again",
                    d, listing, d, k)
        path = os.path.join(workdir, "report", "superseded.csv")
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = [line.rstrip("\n").split(",", 1) for line in f][1:]
        write_csv(path, ["moved_to", "changes"],
                  [*rows, [os.path.relpath(f"{d}.old{k}", workdir), listing.replace(",", ";")]])
    sharding.barrier("jaxmed_supersede")


def compare(workdir: str, config, section: str, run_one, report: Callable[[dict], dict | None],
            *, harmless: tuple[str, ...] = (), **group) -> dict:
    """`run_all`, then `report(results)` on the lead process (it writes workdir/report/ and
    returns the method's headline figures); other processes return {}."""
    results = run_all(workdir, config, section, run_one, harmless=harmless, **group)
    if not sharding.is_lead_process():
        return {}
    return report(results) or {}


def _to_float(v):
    if isinstance(v, (bool, str, dict, list, tuple)) or v is None:
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(results: Mapping[str, Sequence[Mapping]], metrics: Sequence[str]
              ) -> dict[str, dict[str, float]]:
    """{method: {metric: mean, metric_std: sd, metric_n: finite values, 'seeds': n, 'runs':
    runs}}: a non-finite value is left out of the mean, the sd and the count a verdict needs;
    `seeds` (comparison.csv's column) is the fewest finite values of any metric that has one,
    so a seed whose metric is NaN is not counted as if it had given a number."""
    out = {}
    for method, runs in results.items():
        row: dict[str, float] = {"runs": len(runs)}
        for m in metrics:
            vals = np.asarray([r[m] for r in runs if _finite(r.get(m))], np.float64)
            row[m] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            row[f"{m}_n"] = len(vals)
        counts = [row[f"{m}_n"] for m in metrics if row[f"{m}_n"]]
        row["seeds"] = min(counts) if counts else 0
        if counts and min(counts) < len(runs):
            log.warning("%s: %d of %d runs have a non-finite %s", method,
                        len(runs) - min(counts), len(runs),
                        [m for m in metrics if 0 < row[f"{m}_n"] < len(runs)])
        out[method] = row
    return out


def write_comparison(path: str, results, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """comparison.csv (method, seeds, each metric and its _std), atomically; returns the
    summary."""
    summary = summarize(results, metrics)
    header = ["method", "seeds", *[c for m in metrics for c in (m, f"{m}_std")]]
    rows = [[method, row["seeds"], *[f"{row[c]:.6g}" for m in metrics
                                      for c in (m, f"{m}_std")]]
            for method, row in summary.items()]
    write_csv(path, header, rows)
    return summary


def verdict(summary, a: str, b: str, metric: str, *, higher: bool = True) -> str:
    """'better' / 'worse' if `a`'s mean differs from `b`'s by more than two standard errors of
    the difference (each with >= MIN_SEEDS finite values), else 'within noise' or 'too few
    seeds'. `higher`: whether a larger value is better."""
    ra, rb = summary[a], summary[b]
    na, nb = (r.get(f"{metric}_n", r["seeds"]) for r in (ra, rb))
    if min(na, nb) < MIN_SEEDS:
        return FEW
    gap = (ra[metric] - rb[metric]) * (1 if higher else -1)
    se = math.sqrt(ra[f"{metric}_std"] ** 2 / na + rb[f"{metric}_std"] ** 2 / nb)
    if not math.isfinite(gap):
        return FEW
    return BETTER if gap > 2 * se else WORSE if gap < -2 * se else NOISE


def beats(summary, a: str, b: str, metric: str, *, higher: bool = True) -> bool:
    """`verdict(...) == 'better'`."""
    return verdict(summary, a, b, metric, higher=higher) == BETTER


def verdict_line(summary, a: str, b: str, metric: str, *, higher: bool = True,
                 digits: int = 3) -> str:
    """'a vs b on metric: mean ± sd vs mean ± sd (gap g, 2 SE e, n_a / n_b seeds): verdict'."""
    ra, rb = summary[a], summary[b]
    na, nb = (r.get(f"{metric}_n", r["seeds"]) for r in (ra, rb))
    gap = ra[metric] - rb[metric]
    se = (math.sqrt(ra[f"{metric}_std"] ** 2 / max(na, 1) + rb[f"{metric}_std"] ** 2
                    / max(nb, 1)))
    f = f".{digits}f"
    return (f"{a} vs {b} on {metric}: {ra[metric]:{f}} ± {ra[f'{metric}_std']:{f}} vs "
            f"{rb[metric]:{f}} ± {rb[f'{metric}_std']:{f}} (gap {gap:+{f}}, 2 SE {2 * se:{f}}, "
            f"{na} / {nb} seeds): {verdict(summary, a, b, metric, higher=higher)}")


RULE = ("Verdicts: better / worse only where the difference of the means exceeds two standard "
        f"errors of the difference, with at least {MIN_SEEDS} seeds each; otherwise within "
        "noise (or too few seeds).")


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
