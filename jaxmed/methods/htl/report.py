"""The HTL comparison report: workdir/report/{comparison.csv, summary.md, *.png}.

comparison.csv: one row per method; the task's test metrics (`test/iou`, ...) and the same
metrics per sub-population the data marks (`test/<attr>_<value>/<metric>`, e.g.
`test/hard_1/iou`), means over the seeds and `_std`. Verdicts (summary.md) against the
baseline follow the kit's one rule (`comparison.verdict`). Figures: the headline metric per
method (overall and per sub-population), the HTL set's size and composition over training, a
grid of HTL examples with dense vs pruned predictions, and the share of each attribute value in
the HTL set against the training set (demographic shares where the metadata has sex / age /
skin type).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from jaxmed.methods.htl import attention
from jaxmed.report import new_figure, save_figure, write_markdown
from jaxmed.train import comparison


def report_metrics(names, results) -> list[str]:
    """The task's test metrics (`names`), then the per-sub-population ones in the results."""
    keys = sorted({k for runs in results.values() for r in runs for k in r})
    groups = [k for k in keys if re.fullmatch(r"test/[^/]+_-?\d+/[^/]+", k)
              and k.rsplit("/", 1)[1] in names]
    return [f"test/{m}" for m in names] + groups


def write_report(config, workdir: str, results, task_metrics) -> dict:
    """workdir/report/ for `results` ({method: [result per seed]}); `task_metrics`: the task's
    metric names (`TASK_METRICS`). Returns the headline figures and the verdicts."""
    task = config.htl.task
    d = os.path.join(workdir, "report")
    os.makedirs(d, exist_ok=True)
    metrics = report_metrics(task_metrics, results)
    summary = comparison.write_comparison(os.path.join(d, "comparison.csv"), results, metrics)
    head = metrics[0]
    comparison.metric_by_method_figure(os.path.join(d, f"{head.split('/')[-1]}_by_method.png"),
                                       results, head)
    name = head.split("/")[-1]
    group_keys = [m for m in metrics if m.endswith(f"/{name}") and m != head]
    for g in group_keys:
        fname = g.removeprefix("test/").replace("/", "_")
        comparison.metric_by_method_figure(os.path.join(d, f"{fname}_by_method.png"), results, g)
    attended = [m for m in results if m != "baseline"]
    lines = [f"# HTL comparison ({task}, {len(config.htl.seeds)} seeds)", "",
             "| method | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for m, row in summary.items():
        lines.append(f"| {m} | " + " | ".join(f"{row[k]:.4f} ± {row[k + '_std']:.4f}"
                                              for k in metrics) + " |")
    lines += ["", "## Verdicts against the baseline", "", comparison.RULE, ""]
    verdicts = {}
    if "baseline" in summary:
        for m in attended:
            for k in [head] + group_keys:
                verdicts[f"{m}:{k}"] = comparison.verdict(summary, m, "baseline", k)
                lines.append("- " + comparison.verdict_line(summary, m, "baseline", k,
                                                            digits=4))
    history = {m: [attention.read_history(r) for r in _run_dirs(workdir, m)] for m in attended}
    if any(h for runs in history.values() for h in runs):
        htl_over_training_figure(os.path.join(d, "htl_over_training.png"), history)
        shares_figure(os.path.join(d, "htl_shares.png"), workdir, attended)
        lines += ["", "Figures: htl_over_training.png (HTL-set size and composition per "
                  "identification), htl_shares.png (share of each attribute value in the last "
                  "HTL set vs the training set)."]
    for m in attended:
        ex = sorted(glob.glob(os.path.join(workdir, "runs", m, "seed_*", "htl_examples.npz")))
        if ex:
            examples_figure(os.path.join(d, "htl_examples.png"), ex[0], task, m)
            lines.append(f"htl_examples.png: HTL samples of {m} ({os.path.dirname(ex[0])}), "
                         "image / truth / dense / pruned at each sparsity.")
            break
    write_markdown(os.path.join(d, "summary.md"), lines)
    return {**{k: summary[m][k] for m in summary for k in [head] if m == "baseline"},
            **{f"{m}/{k}": summary[m][k] for m in summary for k in [head] + group_keys},
            "verdicts": verdicts}


def _run_dirs(workdir: str, method: str) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, "runs", method, "seed_*")))


def htl_over_training_figure(path: str, history: dict) -> None:
    """HTL-set size, and each minority attribute value's share of the set, per identification
    (one line per method and seed; dashed: the value's share of the training set)."""
    recs = [r for runs in history.values() for h in runs for r in h]
    shares = sorted({k.removeprefix("share_") for r in recs for k in r if k.startswith("share_")})
    minority = [s for s in shares if max(r.get(f"base_{s}", 1) for r in recs) < 0.5]
    fig, axes = new_figure(1, 2, figsize=(10, 3.8))
    colors = ["#08519c", "#e6550d", "#31a354", "#756bb1", "#636363"]
    for i, (m, runs) in enumerate(history.items()):
        for j, h in enumerate(runs):
            steps = [r["step"] for r in h]
            axes[0].plot(steps, [r["size"] for r in h], color=colors[i % 5], alpha=0.8,
                         label=m if j == 0 else None, marker="o", ms=3)
            for k, s in enumerate(minority):
                axes[1].plot(steps, [r[f"share_{s}"] for r in h], color=colors[k % 5],
                             alpha=0.7, marker="o", ms=3, label=f"{s} ({m})" if j == 0 else None,
                             linestyle="-" if i == 0 else ":")
    for k, s in enumerate(minority):
        axes[1].axhline(recs[0][f"base_{s}"], color=colors[k % 5], linestyle="--", lw=1)
    axes[0].set(xlabel="step", ylabel="HTL-set size", title="HTL set size per identification")
    axes[1].set(xlabel="step", ylabel="share of the HTL set",
                title="composition (dashed: share in training set)")
    axes[0].legend(fontsize=7)
    if minority:
        axes[1].legend(fontsize=7)
    save_figure(fig, path)


def shares_figure(path: str, workdir: str, methods) -> None:
    """Per attribute value: share of the last HTL set (pooled over seeds) vs of the training
    set; the demographic analysis where the data has sex / age group / skin type."""
    htl_attrs: dict[str, list] = {}
    base: dict[str, np.ndarray] = {}
    for m in methods:
        for r in _run_dirs(workdir, m):
            files = sorted(glob.glob(os.path.join(r, "htl", "step_*.npz")))
            if not files:
                continue
            z = np.load(files[-1])
            for k in z.files:
                if k.startswith("attr_"):
                    htl_attrs.setdefault(k[5:], []).append(z[k][z["htl"]])
                    base[k[5:]] = z[k]
    if not base:
        return
    names = sorted(base)
    fig, axes = new_figure(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = sorted(set(base[name].tolist()) - {-1})
        pooled = np.concatenate(htl_attrs[name]) if htl_attrs[name] else np.zeros(0)
        x = np.arange(len(values))
        ax.bar(x - 0.2, [np.mean(base[name] == v) for v in values], 0.4, label="training set",
               color="#bdbdbd")
        ax.bar(x + 0.2, [np.mean(pooled == v) if len(pooled) else 0 for v in values], 0.4,
               label="HTL set", color="#08519c")
        ax.set_xticks(x, [str(v) for v in values])
        ax.set(title=name, ylabel="share")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def examples_figure(path: str, npz: str, task: str, method: str) -> None:
    z = np.load(npz)
    n = len(z["index"])
    levels = z["sparsities"]
    seg = "mask" in z.files
    cols = 3 + len(levels) if seg else 1
    fig, axes = new_figure(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    for i in range(n):
        row = axes[i]
        row[0].imshow(z["image"][i])
        if seg:
            row[1].imshow(z["mask"][i] > 127, cmap="gray")
            row[2].imshow(z["dense"][i], cmap="gray")
            for li, s in enumerate(levels):
                row[3 + li].imshow(z["pruned"][li, i], cmap="gray")
            titles = ["image", "truth", "dense"] + [f"pruned {s:.0%}" for s in levels]
        else:
            titles = [f"y={z['label'][i]} dense={z['dense'][i]} pruned="
                      f"{','.join(str(v) for v in z['pruned'][:, i])}"]
        for ax, t in zip(row, titles):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 or not seg:
                ax.set_title(t, fontsize=7)
        row[0].set_ylabel(f"#{z['index'][i]}", fontsize=7)
    fig.suptitle(f"HTL samples ({method}, {task})", fontsize=9)
    save_figure(fig, path)
