"""Report of a continual run: comparison table, accuracy-matrix heatmaps, fairness tables,
subnetwork sizes and overlaps, in workdir/report/."""

from __future__ import annotations

import os

import numpy as np

from jaxmed.report import new_figure, save_figure, write_csv, write_markdown

SUMMARY = ["acc", "bwt", "forgetting", "aware_acc", "task_selection", "eopp0", "eopp1", "eodd",
           "dp_ratio"]


def _heatmap(ax, m, title):
    ax.imshow(np.nan_to_num(m, nan=0.0), vmin=0, vmax=1, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                        color="white" if m[i, j] < 0.6 else "black", fontsize=8)
    ax.set(xlabel="evaluated on task", ylabel="after training task", title=title)
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))


def write_report(d: str, results: dict, tasks) -> None:
    os.makedirs(d, exist_ok=True)
    methods = list(results)
    write_csv(os.path.join(d, "comparison.csv"), ["method", *SUMMARY],
               [[m, *[results[m]["summary"][k] for k in SUMMARY]] for m in methods])
    rows = []
    for m in methods:
        for t, f in enumerate(results[m]["fairness"]):
            rows.append([m, t, *[f[k] for k in sorted(f)]])
    keys = sorted(results[methods[0]]["fairness"][0])
    write_csv(os.path.join(d, "fairness.csv"), ["method", "task", *keys], rows)
    for m in methods:
        for kind in ("agnostic", "aware"):
            write_csv(os.path.join(d, f"accuracy_matrix_{m}_{kind}.csv"),
                       ["after_task", *[f"task{j}" for j in range(len(tasks))]],
                       [[i, *row] for i, row in enumerate(results[m][kind])])

    fig, axes = new_figure(2, len(methods), figsize=(3.2 * len(methods), 6.2), squeeze=False)
    for k, m in enumerate(methods):
        _heatmap(axes[0, k], results[m]["agnostic"], f"{m}\ntask-agnostic")
        _heatmap(axes[1, k], results[m]["aware"], f"{m}\ntask-aware")
    fig.suptitle("Accuracy matrices R[i, j]: after task i, on task j")
    save_figure(fig, os.path.join(d, "accuracy_matrices.png"), dpi=110)

    fig, ax = new_figure(figsize=(1.2 + 1.1 * len(methods), 3.6))
    x = np.arange(len(methods))
    ax.bar(x - 0.2, [results[m]["summary"]["acc"] for m in methods], 0.4, label="final ACC")
    ax.bar(x + 0.2, [results[m]["summary"]["eodd"] for m in methods], 0.4, label="EOdd (sum)")
    ax.set_xticks(x, methods, rotation=30, fontsize=8)
    ax.set(title="Final accuracy (task-agnostic) and equalized-odds gap (task-aware)")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(d, "acc_vs_eodd.png"), dpi=110)

    mask_rows = []
    for m in methods:
        mr = results[m].get("masks")
        if mr:
            for t, (kept, owned) in enumerate(zip(mr["kept"], mr["owned"])):
                mask_rows.append([m, t, mr["unit"], mr["total"], kept, owned,
                                  " ".join(f"{v:.2f}" for v in mr["iou"][t])])
    if mask_rows:
        write_csv(os.path.join(d, "subnetworks.csv"),
                   ["method", "task", "unit", "total", "kept", "owned_new", "iou_with_tasks"],
                   mask_rows)
    num_test = sum(len(t.splits["test"]) for t in tasks)
    _markdown(d, results, methods, mask_rows, num_test)


def _verdicts(results, num_test: int) -> list[str]:
    """One line per baseline (final ACC, aware accuracy, EOdd), each difference judged against
    the binomial standard error of an accuracy on `num_test` samples, and a note when task
    selection is near chance (then task-agnostic ACC is about selection x aware accuracy)."""
    bp = results["biaspruner"]["summary"]
    lines = []

    def se(p):
        return float(np.sqrt(max(p * (1 - p), 1e-12) / max(num_test, 1)))

    for other in ("finetune", "packnet"):
        if other not in results:
            continue
        o = results[other]["summary"]
        parts = []
        for key, name in (("acc", "final ACC"), ("aware_acc", "task-aware accuracy")):
            diff, err = bp[key] - o[key], np.hypot(se(bp[key]), se(o[key]))
            word = "higher" if diff > 0 else "NOT higher"
            noise = " (within 2 standard errors: not significant)" if abs(diff) < 2 * err else ""
            parts.append(f"{name} {bp[key]:.3f} vs {o[key]:.3f}: {word}{noise}")
        parts.append(f"EOdd {bp['eodd']:.3f} vs {o['eodd']:.3f}: "
                     f"{'smaller' if bp['eodd'] < o['eodd'] else 'NOT smaller'}")
        lines.append(f"- vs {other}: " + "; ".join(parts))
    masks = results["biaspruner"].get("masks") or {}
    if any(masks.get("conflicting", [])):
        counts = ", ".join(f"{a} / {c}" for a, c in zip(masks["aligned"], masks["conflicting"]))
        lines.append(f"- The GCE (biased) models split the tasks' training sets into {counts} "
                     "bias-aligned / bias-conflicting samples. Pruning and re-weighting remove "
                     "the bias from the decision (EOdd), but the true cue is learned mostly from "
                     "the conflicting samples: few of them cap task-aware accuracy.")
    num_tasks = len(results["biaspruner"]["agnostic"])
    sel = bp["task_selection"]
    if num_tasks > 1 and sel < 1 / num_tasks + 0.1:
        lines.append(f"- Task selection is near chance ({sel:.2f}; chance {1 / num_tasks:.2f}): "
                     "the subnetworks are no more confident on their own task's images than on "
                     "the others', so task-agnostic ACC is roughly selection x task-aware "
                     "accuracy and mostly measures selection; compare task-aware accuracy and "
                     "EOdd for the debiasing itself.")
    return lines


def _markdown(d, results, methods, mask_rows, num_test: int):
    lines = ["# Continual learning report", "",
             "ACC / BWT / forgetting from the task-agnostic accuracy matrix (entropy-selected "
             "task); fairness (EOpp0, EOpp1, EOdd = sum of TPR and FPR gaps, DP ratio) on each "
             "task's unbiased test set with its own head, averaged over tasks.", "",
             "| method | " + " | ".join(SUMMARY) + " |", "|---" * (len(SUMMARY) + 1) + "|"]
    for m in methods:
        s = results[m]["summary"]
        lines.append(f"| {m} | " + " | ".join(f"{s[k]:.3f}" for k in SUMMARY) + " |")
    if "biaspruner" in results:
        lines += ["", "## BiasPruner against its baselines", ""]
        lines += _verdicts(results, num_test)
    if mask_rows:
        lines += ["", "## Subnetworks", "", "| method | task | unit | total | kept | owned new "
                  "| IoU with tasks |", "|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in mask_rows]
    lines += ["", "Files: comparison.csv, fairness.csv, accuracy_matrix_<method>_<kind>.csv, "
              "subnetworks.csv, accuracy_matrices.png, acc_vs_eodd.png."]
    write_markdown(os.path.join(d, "report.md"), lines)
