"""workdir/report/ of a semi-supervised comparison: comparison.csv (means and _std over seeds),
summary.md (table, verdicts by the comparison engine's one rule, the split and the exact config) and
figures: test AUC per method with each seed, mask rate and pseudo-label accuracy on the
unlabeled set over training, per-class recall."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxmed.report import new_figure, save_figure, write_markdown
from jaxmed.train import comparison
from jaxmed.train.writers import read_metrics

CURVES = (("train/mask_rate", "mask rate (unlabeled)"),
          ("train/pl_accuracy", "pseudo-label accuracy (unlabeled)"))


def training_curves(workdir: str, method: str, seeds) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, mean over seeds)} of the logged unlabeled-set metrics."""
    per_seed = []
    for seed in seeds:
        path = os.path.join(comparison.run_dir(workdir, method, seed), "metrics.jsonl")
        if os.path.exists(path):
            per_seed.append(read_metrics(path))
    out = {}
    for key, _ in CURVES:
        series = [{s: m[key] for s, m in rows.items() if key in m} for rows in per_seed]
        common = sorted(set.intersection(*[set(x) for x in series])) if series else []
        if common:
            out[key] = (np.asarray(common), np.mean([[x[s] for s in common] for x in series], 0))
    return out


def curves_figure(path: str, workdir: str, methods, seeds) -> None:
    fig, axes = new_figure(1, len(CURVES), figsize=(5.2 * len(CURVES), 3.6))
    for ax, (key, title) in zip(axes, CURVES):
        for m in methods:
            c = training_curves(workdir, m, seeds).get(key)
            if c is not None:
                ax.plot(c[0], c[1], label=m)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
    if axes[-1].get_legend_handles_labels()[0]:  # supervised-only logs no unlabeled curve
        axes[-1].legend(fontsize=7)
    save_figure(fig, path)


def recall_figure(path: str, results) -> None:
    methods = list(results)
    keys = sorted({k for runs in results.values() for r in runs for k in r
                   if k.startswith("test/recall/")})
    if not keys:
        return
    fig, ax = new_figure(figsize=(1.5 + 0.9 * len(keys) * max(len(methods), 1) / 3, 3.6))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [np.nanmean([r.get(k, np.nan) for r in results[m]]) for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [k.split("/")[-1] for k in keys],
                  rotation=30, ha="right")
    ax.set_ylabel("test recall (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def write_report(workdir: str, config, results, metrics) -> dict:
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    summary = comparison.write_comparison(os.path.join(out, "comparison.csv"), results, metrics)
    methods, seeds = list(results), list(config.ssl.seeds)
    comparison.metric_by_method_figure(os.path.join(out, "test_auc.png"), results, "test/auc",
                                       title="test AUC per method (dots: seeds)")
    curves_figure(os.path.join(out, "unlabeled_training.png"), workdir, methods, seeds)
    recall_figure(os.path.join(out, "per_class_recall.png"), results)

    lines = ["# Semi-supervised comparison", "",
             f"Data: `{config.data.name}`; labeled / unlabeled: "
             f"{_first(results, 'data/num_labeled')} / {_first(results, 'data/num_unlabeled')}; "
             f"seeds {tuple(seeds)}; {config.train.steps or 'epochs'} steps of "
             f"{config.train.batch_size} labeled + {config.ssl.mu}x unlabeled.", "",
             "| method | " + " | ".join(m[len("test/"):] for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for m in methods:
        row = summary[m]
        lines.append(f"| {m} | " + " | ".join(f"{row[k]:.3f} ± {row[f'{k}_std']:.3f}"
                                              for k in metrics) + " |")
    evaluated = ("the EMA model of the student (config.ssl.eval_ema, USB's convention); "
                 "student/...: the raw student" if config.ssl.eval_ema else "the raw student")
    lines += ["", f"Means ± standard deviation over the seeds (ddof 1); test figures of "
              f"{evaluated}. " + comparison.RULE, ""]
    base = "supervised" if "supervised" in summary else None
    for key in [k for k in ("test/auc", "test/student/auc") if k in metrics]:
        for m in methods:
            if base is not None and m != base:
                lines.append("- " + comparison.verdict_line(summary, m, base, key))
    lines += ["", "Figures: `test_auc.png`, `unlabeled_training.png` (mask rate and pseudo-label "
              "accuracy on the unlabeled set, mean over seeds), `per_class_recall.png`.", "",
              "Run time per method (s, mean over seeds): " + ", ".join(
                  f"{m} {np.mean([r.get('time/run_s', np.nan) for r in results[m]]):.0f}"
                  for m in methods), "",
              "## Config", "", "```json", json.dumps(json.loads(config.to_json()), indent=1),
              "```"]
    write_markdown(os.path.join(out, "summary.md"), lines)
    return summary


def _first(results, key):
    for runs in results.values():
        for r in runs:
            if key in r:
                return int(r[key])
    return "?"
