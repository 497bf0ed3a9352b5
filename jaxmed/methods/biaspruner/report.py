"""Report of a continual comparison over seeds, in workdir/report/: comparison.csv (the means
and sample sds, `_std`, of the `test/...` metrics, as every comparison), runs.csv (every seed),
fairness.csv (per task), the accuracy matrices, subnetworks.csv, figures and report.md. The
numbers of report.md are means over the seeds with their standard error (SE = sample sd /
sqrt(seeds)); the figures show the spread; every verdict is `comparison.verdict`'s."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxmed.report import new_figure, save_figure, write_csv, write_markdown
from jaxmed.train import comparison

SUMMARY = [f"test/{k}" for k in (
    "acc", "acc_aligned", "acc_conflicting", "bwt", "forgetting", "aware_acc",
    "aware_acc_aligned", "aware_acc_conflicting", "task_selection", "selection_aligned",
    "selection_conflicting", "task_selection_entropy", "eopp0", "eopp1", "eodd", "dp_ratio")]
FAIRNESS = ["eopp0", "eopp1", "eodd", "dp_ratio", "accuracy_group0", "accuracy_group1",
            "balanced_accuracy_group0", "balanced_accuracy_group1"]
CONTINUAL = ("biaspruner", "biaspruner_magnitude", "packnet", "finetune", "ewc", "lwf", "lff")
BASELINES = ("finetune", "packnet", "ewc", "lwf", "lff", "biaspruner_magnitude", "joint")


def with_se(summary: dict, metrics) -> dict:
    """`comparison.summarize`'s rows with `<metric>_se` = sd / sqrt(n) (NaN below two values)."""
    for row in summary.values():
        for k in metrics:
            n = row[f"{k}_n"]
            row[f"{k}_se"] = row[f"{k}_std"] / math.sqrt(n) if n > 1 else math.nan
    return summary


def summarize(results: dict) -> dict:
    """{method: {metric: mean, _std, _n, _se, 'seeds'}} of every `test/...` metric of the
    runs' results."""
    found = [k for r in next(iter(results.values())) for k in r if k.startswith("test/")]
    metrics = list(dict.fromkeys([*SUMMARY, *found]))
    return with_se(comparison.summarize(results, metrics), metrics)


def fmt(mean: float, se: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if np.isfinite(se) else "")


def _fmt(row: dict, metric: str) -> str:
    return fmt(row[metric], row[f"{metric}_se"])


def _matrices(runs: list[dict], kind: str) -> np.ndarray:
    """[seeds, T, T]: every seed's accuracy matrix of `kind` (agnostic / aware / selection)."""
    return np.stack([np.asarray(r["details"][kind], np.float64) for r in runs])


def _heatmap(ax, mean, sd, title):
    ax.imshow(np.nan_to_num(mean, nan=0.0), vmin=0, vmax=1, cmap="viridis")
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            if not np.isnan(mean[i, j]):
                ax.text(j, i, f"{mean[i, j]:.2f}\n±{sd[i, j]:.2f}", ha="center", va="center",
                        color="white" if mean[i, j] < 0.6 else "black", fontsize=7)
    ax.set(xlabel="evaluated on task", ylabel="after training task", title=title)
    ax.set_xticks(range(mean.shape[1]))
    ax.set_yticks(range(mean.shape[0]))


def _bars(ax, methods, summary, results, keys, labels):
    """Grouped bars (mean), SE error bars, and each seed as a dot."""
    width = 0.8 / len(keys)
    x = np.arange(len(methods))
    for i, (k, label) in enumerate(zip(keys, labels)):
        pos = x + (i - (len(keys) - 1) / 2) * width
        means = [summary[m][k] for m in methods]
        ses = [np.nan_to_num(summary[m][f"{k}_se"]) for m in methods]
        ax.bar(pos, means, width, yerr=ses, capsize=2, label=label, alpha=0.8)
        for p, m in zip(pos, methods):
            vals = [r.get(k) for r in results[m]]
            ax.scatter([p] * len(vals), vals, s=6, color="black", zorder=3)
    ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7)


def write_report(d: str, results: dict, *, num_tasks: int, selection: str = "entropy") -> dict:
    """results: {method: [each seed's result (`run.run_method`, result.json)]}. Returns
    {'<method>/<metric>': mean, '<method>/<metric>_std' / '_se' / '_n'}."""
    os.makedirs(d, exist_ok=True)
    methods = list(results)
    summary = summarize(results)
    comparison.write_comparison(os.path.join(d, "comparison.csv"), results, SUMMARY)
    write_csv(os.path.join(d, "runs.csv"), ["method", "seed_index", *SUMMARY],
              [[m, i, *[f"{r.get(k, math.nan):.6g}" for k in SUMMARY]]
               for m in methods for i, r in enumerate(results[m])])
    fair_rows = []
    for m in methods:
        for t in range(len(results[m][0]["details"]["fairness"])):
            per_task = with_se(comparison.summarize(
                {m: [r["details"]["fairness"][t] for r in results[m]]}, FAIRNESS), FAIRNESS)[m]
            fair_rows.append([m, t, *[f"{per_task[c]:.6g}" for k in FAIRNESS
                                      for c in (k, f"{k}_se")]])
    write_csv(os.path.join(d, "fairness.csv"),
              ["method", "task", *[c for k in FAIRNESS for c in (k, f"{k}_se")]], fair_rows)
    for m in methods:
        for kind in ("agnostic", "aware"):
            stack = _matrices(results[m], kind)
            write_csv(os.path.join(d, f"accuracy_matrix_{m}_{kind}.csv"),
                      ["after_task", *[f"task{j}" for j in range(num_tasks)],
                       *[f"task{j}_sd" for j in range(num_tasks)]],
                      [[i, *stack.mean(0)[i], *stack.std(0)[i]] for i in range(num_tasks)])

    fig, axes = new_figure(2, len(methods), figsize=(3.2 * len(methods), 6.4), squeeze=False)
    for k, m in enumerate(methods):
        for row, kind in enumerate(("agnostic", "aware")):
            stack = _matrices(results[m], kind)
            _heatmap(axes[row, k], stack.mean(0), stack.std(0), f"{m}\ntask-{kind}")
    fig.suptitle("Accuracy matrices R[i, j] (after task i, on task j): mean ± sd over seeds")
    save_figure(fig, os.path.join(d, "accuracy_matrices.png"), dpi=110)

    fig, ax = new_figure(figsize=(1.6 + 1.2 * len(methods), 3.8))
    _bars(ax, methods, summary, results, ["test/acc", "test/acc_aligned", "test/acc_conflicting"],
          ["unbiased test", "bias-aligned", "bias-conflicting"])
    ax.set(ylim=(0, 1), ylabel="final task-agnostic accuracy",
           title="Aligned vs conflicting test images\n(mean ± SE; dots: seeds)")
    save_figure(fig, os.path.join(d, "aligned_vs_conflicting.png"), dpi=110)

    fig, ax = new_figure(figsize=(1.6 + 1.2 * len(methods), 3.8))
    _bars(ax, methods, summary, results,
          ["test/acc", "test/aware_acc", "test/task_selection", "test/eodd"],
          ["final ACC (agnostic)", "task-aware acc", "task selection", "EOdd (sum)"])
    ax.set(title="Accuracy, task selection, equalized-odds gap\n(mean ± SE; dots: seeds)")
    save_figure(fig, os.path.join(d, "acc_vs_eodd.png"), dpi=110)
    for k in ("acc", "eodd"):
        comparison.metric_by_method_figure(os.path.join(d, f"{k}_by_method.png"), results,
                                           f"test/{k}")

    mask_rows = []
    for m in methods:
        for i, r in enumerate(results[m]):
            mr = r["details"].get("masks")
            if mr:
                for t, (kept, owned) in enumerate(zip(mr["kept"], mr["owned"])):
                    mask_rows.append([m, i, t, mr["unit"], mr["total"], kept, owned,
                                      mr["aligned"][t], mr["conflicting"][t],
                                      " ".join(f"{v:.2f}" for v in mr["iou"][t])])
    if mask_rows:
        write_csv(os.path.join(d, "subnetworks.csv"),
                  ["method", "seed_index", "task", "unit", "total", "kept", "owned_new",
                   "gce_aligned", "gce_conflicting", "iou_with_tasks"], mask_rows)
    _markdown(d, summary, methods, bool(mask_rows), num_tasks, selection)
    return {f"{m}/{k}": v for m, row in summary.items() for k, v in row.items()}


def verdicts(summary: dict, num_tasks: int) -> list[str]:
    """BiasPruner against each baseline on final ACC (unbiased test), ACC on the conflicting
    images, and EOdd (lower is better), each judged by `comparison.verdict`; EOdd rank among
    the continual methods; task selection against chance."""
    if "biaspruner" not in summary:
        return []
    bp = summary["biaspruner"]
    judged = [("final ACC", "test/acc", True), ("on conflicting images",
                                                "test/acc_conflicting", True),
              ("EOdd", "test/eodd", False)]
    if not np.isfinite(bp.get("test/acc_conflicting", math.nan)):
        del judged[1]
    lines = []
    for other in BASELINES:
        if other not in summary:
            continue
        lines.append(f"- vs {other}: " + "; ".join(
            f"{label} {_fmt(bp, k)} vs {_fmt(summary[other], k)}: "
            f"{comparison.verdict(summary, 'biaspruner', other, k, higher=higher)}"
            for label, k, higher in judged))
    cont = [m for m in CONTINUAL if m in summary and np.isfinite(summary[m]["test/eodd"])]
    if len(cont) > 1:
        order = sorted(cont, key=lambda m: summary[m]["test/eodd"])
        lines.append("- EOdd, lowest first (continual methods, joint excluded): "
                     + ", ".join(f"{m} {summary[m]['test/eodd']:.3f}" for m in order))
    if num_tasks > 1:
        k = "test/task_selection"
        sel, se, chance = bp[k], bp[f"{k}_se"], 1 / num_tasks
        word = (comparison.FEW if bp[f"{k}_n"] < comparison.MIN_SEEDS else
                "above chance" if sel - chance > 2 * se else "not above chance")
        lines.append(f"- BiasPruner task selection {_fmt(bp, k)} (chance {chance:.2f}): {word} "
                     f"(the mean beyond 2 SE above chance, >= {comparison.MIN_SEEDS} seeds)")
        ent = bp.get("test/task_selection_entropy", math.nan)
        if np.isfinite(ent) and abs(ent - sel) > 1e-9:
            lines.append(f"- (the entropy rule would pick the right task "
                         f"{_fmt(bp, 'test/task_selection_entropy')} of the time)")
    return lines


def _markdown(d, summary, methods, has_masks: bool, num_tasks: int, selection: str):
    seeds = sorted({summary[m]["seeds"] for m in methods})
    cols = ["acc", "acc_aligned", "acc_conflicting", "aware_acc", "aware_acc_conflicting",
            "task_selection", "selection_conflicting", "task_selection_entropy", "bwt", "eodd",
            "eopp0", "eopp1"]
    lines = ["# Continual learning report", "",
             f"Mean ± standard error over {'/'.join(map(str, seeds))} seeds of the test/... "
             "metrics (columns without the prefix). ACC / BWT from the "
             "task-agnostic accuracy matrix (the task chosen by config.continual.task_selection: "
             f"'{selection}' for the methods with per-task BatchNorm, entropy for the others; "
             "task_selection_entropy: how often the entropy rule picks the right task) on the "
             "unbiased test images; "
             "acc_aligned / acc_conflicting: the same on the bias-aligned / bias-conflicting "
             "test images; fairness (EOdd = sum of TPR and FPR gaps) on each task's unbiased "
             "test set with its own head, averaged over tasks.", "",
             "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(summary[m], f"test/{k}") for k in cols)
                     + " |")
    v = verdicts(summary, num_tasks)
    if v:
        lines += ["", "## BiasPruner against its baselines", "", comparison.RULE, "", *v]
    if has_masks:
        lines += ["", "Subnetwork sizes, overlaps and the GCE models' aligned / conflicting "
                  "counts per seed: subnetworks.csv."]
    lines += ["", "Files: comparison.csv (means, _std), runs.csv (every seed), fairness.csv, "
              "accuracy_matrix_<method>_<kind>.csv, accuracy_matrices.png, "
              "aligned_vs_conflicting.png, acc_vs_eodd.png, acc_by_method.png, "
              "eodd_by_method.png."]
    write_markdown(os.path.join(d, "report.md"), lines)
