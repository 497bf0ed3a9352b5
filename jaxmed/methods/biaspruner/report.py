"""Report of a continual comparison over seeds, in workdir/report/: every number of report.md is a
mean over the seeds with its standard error (SE = sample sd / sqrt(seeds); comparison.csv has
the means and sample sds, `_std`, as every comparison), every figure shows the spread,
and a verdict is drawn only from two or more seeds, when a difference of means exceeds two
standard errors of the difference (sqrt(SE_a^2 + SE_b^2))."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxmed.report import new_figure, save_figure, write_csv, write_markdown
from jaxmed.train import comparison
from jaxmed.train.comparison import metric_by_method_figure

SUMMARY = ["acc", "acc_aligned", "acc_conflicting", "bwt", "forgetting", "aware_acc",
           "aware_acc_aligned", "aware_acc_conflicting", "task_selection", "selection_aligned",
           "selection_conflicting", "task_selection_entropy", "eopp0", "eopp1", "eodd", "dp_ratio"]
FAIRNESS = ["eopp0", "eopp1", "eodd", "dp_ratio", "accuracy_group0", "accuracy_group1",
            "balanced_accuracy_group0", "balanced_accuracy_group1"]
CONTINUAL = ("biaspruner", "biaspruner_magnitude", "packnet", "finetune", "ewc", "lwf", "lff")
BASELINES = ("finetune", "packnet", "ewc", "lwf", "lff", "biaspruner_magnitude", "joint")


def mean_se(values) -> tuple[float, float, int]:
    """Mean and standard error of the finite values (SE NaN with fewer than two)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return math.nan, math.nan, 0
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se, len(v)


def summarize(details: dict) -> dict:
    """{method: {metric: mean, metric_std: sd, metric_se: SE, 'seeds': n}} over each run's
    summary: the shared `comparison.summarize`, plus the standard error the verdicts use."""
    runs = {m: [r["summary"] for r in rs] for m, rs in details.items()}
    metrics = list(next(iter(runs.values()))[0])
    out = comparison.summarize(runs, metrics)
    for m, row in out.items():
        for k in metrics:
            row[f"{k}_se"] = mean_se([r.get(k) for r in runs[m]])[1]
    return out


def fmt(mean: float, se: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if np.isfinite(se) else "")


def compare(summary: dict, a: str, b: str, metric: str, *, higher: bool = True) -> str:
    """'better', 'worse' (beyond two SE of the difference), 'not significant', or 'one seed'."""
    ra, rb = summary[a], summary[b]
    if ra["seeds"] < 2 or rb["seeds"] < 2:
        return "one seed: no verdict"
    diff = (ra[metric] - rb[metric]) * (1 if higher else -1)
    err = math.hypot(ra[f"{metric}_se"], rb[f"{metric}_se"])
    if diff > 2 * err:
        return "better (> 2 SE)"
    if diff < -2 * err:
        return "worse (> 2 SE)"
    return "not significant (< 2 SE)"


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


def _bars(ax, methods, summary, details, keys, labels):
    """Grouped bars (mean), SE error bars, and each seed as a dot."""
    width = 0.8 / len(keys)
    x = np.arange(len(methods))
    for i, (k, label) in enumerate(zip(keys, labels)):
        pos = x + (i - (len(keys) - 1) / 2) * width
        means = [summary[m][k] for m in methods]
        ses = [np.nan_to_num(summary[m][f"{k}_se"]) for m in methods]
        ax.bar(pos, means, width, yerr=ses, capsize=2, label=label, alpha=0.8)
        for p, m in zip(pos, methods):
            vals = [r["summary"].get(k) for r in details[m]]
            ax.scatter([p] * len(vals), vals, s=6, color="black", zorder=3)
    ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7)


def write_report(d: str, details: dict, tasks, selection: str = "entropy") -> None:
    """details: {method: [each seed's run_method result (results.json)]}."""
    os.makedirs(d, exist_ok=True)
    methods = list(details)
    summary = summarize(details)
    comparison.write_comparison(os.path.join(d, "comparison.csv"),
                                {m: [r["summary"] for r in rs] for m, rs in details.items()},
                                SUMMARY)
    write_csv(os.path.join(d, "runs.csv"), ["method", "seed_index", *SUMMARY],
              [[m, i, *[f"{r['summary'].get(k, math.nan):.6g}" for k in SUMMARY]]
               for m in methods for i, r in enumerate(details[m])])
    fair_rows = []
    for m in methods:
        for t in range(len(details[m][0]["fairness"])):
            cells = []
            for k in FAIRNESS:
                mean, se, _ = mean_se([r["fairness"][t].get(k) for r in details[m]])
                cells += [f"{mean:.6g}", f"{se:.6g}"]
            fair_rows.append([m, t, *cells])
    write_csv(os.path.join(d, "fairness.csv"),
              ["method", "task", *[c for k in FAIRNESS for c in (k, f"{k}_se")]], fair_rows)
    for m in methods:
        for kind in ("agnostic", "aware"):
            stack = np.stack([np.asarray(r[kind], np.float64) for r in details[m]])
            write_csv(os.path.join(d, f"accuracy_matrix_{m}_{kind}.csv"),
                      ["after_task", *[f"task{j}" for j in range(len(tasks))],
                       *[f"task{j}_sd" for j in range(len(tasks))]],
                      [[i, *stack.mean(0)[i], *stack.std(0)[i]] for i in range(len(tasks))])

    fig, axes = new_figure(2, len(methods), figsize=(3.2 * len(methods), 6.4), squeeze=False)
    for k, m in enumerate(methods):
        for row, kind in enumerate(("agnostic", "aware")):
            stack = np.stack([np.asarray(r[kind], np.float64) for r in details[m]])
            _heatmap(axes[row, k], stack.mean(0), stack.std(0), f"{m}\ntask-{kind}")
    fig.suptitle("Accuracy matrices R[i, j] (after task i, on task j): mean ± sd over seeds")
    save_figure(fig, os.path.join(d, "accuracy_matrices.png"), dpi=110)

    fig, ax = new_figure(figsize=(1.6 + 1.2 * len(methods), 3.8))
    _bars(ax, methods, summary, details, ["acc", "acc_aligned", "acc_conflicting"],
          ["unbiased test", "bias-aligned", "bias-conflicting"])
    ax.set(ylim=(0, 1), ylabel="final task-agnostic accuracy",
           title="Aligned vs conflicting test images\n(mean ± SE; dots: seeds)")
    save_figure(fig, os.path.join(d, "aligned_vs_conflicting.png"), dpi=110)

    fig, ax = new_figure(figsize=(1.6 + 1.2 * len(methods), 3.8))
    _bars(ax, methods, summary, details, ["acc", "aware_acc", "task_selection", "eodd"],
          ["final ACC (agnostic)", "task-aware acc", "task selection", "EOdd (sum)"])
    ax.set(title="Accuracy, task selection, equalized-odds gap\n(mean ± SE; dots: seeds)")
    save_figure(fig, os.path.join(d, "acc_vs_eodd.png"), dpi=110)
    flat = {m: [r["summary"] for r in details[m]] for m in methods}
    for k in ("acc", "eodd"):
        metric_by_method_figure(os.path.join(d, f"{k}_by_method.png"), flat, k)

    mask_rows = []
    for m in methods:
        for i, r in enumerate(details[m]):
            mr = r.get("masks")
            if mr:
                for t, (kept, owned) in enumerate(zip(mr["kept"], mr["owned"])):
                    mask_rows.append([m, i, t, mr["unit"], mr["total"], kept, owned,
                                      mr["aligned"][t], mr["conflicting"][t],
                                      " ".join(f"{v:.2f}" for v in mr["iou"][t])])
    if mask_rows:
        write_csv(os.path.join(d, "subnetworks.csv"),
                  ["method", "seed_index", "task", "unit", "total", "kept", "owned_new",
                   "gce_aligned", "gce_conflicting", "iou_with_tasks"], mask_rows)
    _markdown(d, summary, details, methods, bool(mask_rows), len(tasks), selection)


def verdicts(summary: dict, num_tasks: int) -> list[str]:
    """BiasPruner against each baseline on final ACC (unbiased test), ACC on the conflicting
    images, and EOdd (lower is better), judged by `compare`; EOdd rank among the continual
    methods; task selection against chance."""
    if "biaspruner" not in summary:
        return []
    bp = summary["biaspruner"]
    lines = []
    for other in BASELINES:
        if other not in summary:
            continue
        o = summary[other]
        parts = [f"final ACC {fmt(bp['acc'], bp['acc_se'])} vs {fmt(o['acc'], o['acc_se'])}: "
                 f"{compare(summary, 'biaspruner', other, 'acc')}"]
        if np.isfinite(bp.get("acc_conflicting", math.nan)):
            parts.append(f"on conflicting images {fmt(bp['acc_conflicting'], bp['acc_conflicting_se'])}"
                         f" vs {fmt(o['acc_conflicting'], o['acc_conflicting_se'])}: "
                         f"{compare(summary, 'biaspruner', other, 'acc_conflicting')}")
        parts.append(f"EOdd {fmt(bp['eodd'], bp['eodd_se'])} vs {fmt(o['eodd'], o['eodd_se'])}: "
                     f"{compare(summary, 'biaspruner', other, 'eodd', higher=False)}")
        lines.append(f"- vs {other}: " + "; ".join(parts))
    cont = [m for m in CONTINUAL if m in summary and np.isfinite(summary[m]["eodd"])]
    if len(cont) > 1:
        order = sorted(cont, key=lambda m: summary[m]["eodd"])
        lines.append("- EOdd, lowest first (continual methods, joint excluded): "
                     + ", ".join(f"{m} {summary[m]['eodd']:.3f}" for m in order))
    if num_tasks > 1:
        sel, se = bp["task_selection"], bp["task_selection_se"]
        chance = 1 / num_tasks
        word = ("above chance by > 2 SE" if bp["seeds"] > 1 and sel - chance > 2 * se else
                "NOT above chance by 2 SE" if bp["seeds"] > 1 else "one seed: no verdict")
        lines.append(f"- BiasPruner task selection {fmt(sel, se)} (chance {chance:.2f}): {word}")
        ent = bp.get("task_selection_entropy", math.nan)
        if np.isfinite(ent) and abs(ent - sel) > 1e-9:
            lines.append(f"- (the entropy rule would pick the right task "
                         f"{fmt(ent, bp['task_selection_entropy_se'])} of the time)")
    return lines


def _markdown(d, summary, details, methods, has_masks: bool, num_tasks: int, selection: str):
    seeds = sorted({summary[m]["seeds"] for m in methods})
    cols = ["acc", "acc_aligned", "acc_conflicting", "aware_acc", "aware_acc_conflicting",
            "task_selection", "selection_conflicting", "task_selection_entropy", "bwt", "eodd",
            "eopp0", "eopp1"]
    lines = ["# Continual learning report", "",
             f"Mean ± standard error over {'/'.join(map(str, seeds))} seeds. ACC / BWT from the "
             "task-agnostic accuracy matrix (the task chosen by config.continual.task_selection: "
             f"'{selection}' for the methods with per-task BatchNorm, entropy for the others; "
             "task_selection_entropy: how often the entropy rule picks the right task) on the "
             "unbiased test images; "
             "acc_aligned / acc_conflicting: the same on the bias-aligned / bias-conflicting "
             "test images; fairness (EOdd = sum of TPR and FPR gaps) on each task's unbiased "
             "test set with its own head, averaged over tasks.", "",
             "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        s = summary[m]
        lines.append(f"| {m} | " + " | ".join(fmt(s.get(k, math.nan), s.get(f"{k}_se", math.nan))
                                              for k in cols) + " |")
    v = verdicts(summary, num_tasks)
    if v:
        lines += ["", "## BiasPruner against its baselines (verdicts need > 2 SE)", "", *v]
    if has_masks:
        lines += ["", "Subnetwork sizes, overlaps and the GCE models' aligned / conflicting "
                  "counts per seed: subnetworks.csv."]
    lines += ["", "Files: comparison.csv (means, _std), runs.csv (every seed), fairness.csv, "
              "accuracy_matrix_<method>_<kind>.csv, accuracy_matrices.png, "
              "aligned_vs_conflicting.png, acc_vs_eodd.png, acc_by_method.png, "
              "eodd_by_method.png."]
    write_markdown(os.path.join(d, "report.md"), lines)
