"""PruneCXR's report: CSV tables, PNG figures and summary.md in workdir/report/, from the
sweep arrays (`stages.load_sweeps`) through `analysis.analyze`."""

from __future__ import annotations

import os

import matplotlib.cm
import matplotlib.colors
import numpy as np

from jaxmed.data.images import decode_image
from jaxmed.methods.prunecxr import analysis as A
from jaxmed.report import new_figure, save_figure, write_csv, write_markdown

TARGETS = {  # the reference's printed figures (r, rho): NIH, MIMIC
    "log train freq vs first 20% AP drop": ((0.64, 0.61), (0.82, 0.93)),
    "log train freq vs relative AP change at 95%": ((0.80, 0.75), (0.76, 0.75)),
    "FCD vs |diff of log freq|": ((0.71, 0.64), (0.59, 0.60)),
    "FCD vs IoU^(1/4)": ((-0.43, -0.47), (-0.28, -0.30)),
}


def _fmt(v):
    if v is None:
        return "none"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(config, workdir: str, ds, sweeps: dict) -> dict:
    """Write workdir/report/ and return the headline figures (correlations, dense mAP, PIE
    prevalence ratios)."""
    res = A.analyze(sweeps, config.prunecxr)
    d = os.path.join(workdir, "report")
    os.makedirs(d, exist_ok=True)
    names, sp = res["class_names"], res["sparsities"]
    _tables(d, res)
    _figures(d, res)
    _pie_grid(os.path.join(d, "pie_grid.png"), res, ds, config)
    summary = _summary(d, res, config)
    return summary | {"num_classes": len(names), "num_sparsities": len(sp)}


def _tables(d, res):
    names, sp = res["class_names"], res["sparsities"]
    rows = []
    for kind, k in res["kinds"].items():
        for metric, arr in k["metrics"].items():
            for r in range(arr.shape[0]):
                for s in range(arr.shape[1]):
                    rows += [[kind, metric, r, sp[s], names[c], arr[r, s, c]]
                             for c in range(arr.shape[2])]
    write_csv(os.path.join(d, "metrics_by_sparsity.csv"),
              ["prune_type", "metric", "run", "sparsity", "class", "value"], rows)
    rows = [[kind, metric, names[c], sp[s], k["curves"][metric][s, c]]
            for kind, k in res["kinds"].items() for metric in k["curves"]
            for c in range(len(names)) for s in range(len(sp))]
    write_csv(os.path.join(d, "forgettability.csv"),
              ["prune_type", "metric", "class", "sparsity", "median_relative_change"], rows)
    rows = []
    for kind, k in res["kinds"].items():
        dense = np.median(k["metrics"]["ap"][:, 0], axis=0)
        rows += [[kind, names[c], int(res["counts"][c]), res["log_freq"][c], dense[c],
                  _fmt(k["first_drop"][c]), k["change"][c]] for c in range(len(names))]
    write_csv(os.path.join(d, "per_class.csv"),
              ["prune_type", "class", "train_count", "log_freq", "dense_ap_median",
               "first_20pct_ap_drop", "relative_ap_change_at_95"], rows)
    rows = [[kind, rel, c.n, c.pearson_r, c.pearson_p, c.spearman_rho, c.spearman_p]
            for kind, k in res["kinds"].items() for rel, c in k["corr"].items()]
    write_csv(os.path.join(d, "correlations.csv"),
              ["prune_type", "relation", "n", "pearson_r", "pearson_p", "spearman_rho",
               "spearman_p"], rows)
    rows = [[kind, names[i], names[j], f, dl, q] for kind, k in res["kinds"].items()
            for i, j, f, dl, q in zip(k["pairs"]["i"], k["pairs"]["j"], k["pairs"]["fcd"],
                                      k["pairs"]["dlogfreq"], k["pairs"]["iou_quarter"])]
    write_csv(os.path.join(d, "class_pairs.csv"),
              ["prune_type", "class_a", "class_b", "fcd", "abs_diff_log_freq", "iou_quarter"],
              rows)
    p = res["pies"]
    is_pie = np.zeros(len(p["scores"]), bool)
    is_pie[p["indices"]] = True
    write_csv(os.path.join(d, "pies.csv"),
              ["test_row", "index", "spearman_dense_vs_pruned", "is_pie", "labels"],
              [[i, int(res["index"][i]), p["scores"][i], int(is_pie[i]),
                "|".join(n for n, y in zip(names, res["labels"][i]) if y > 0.5)]
               for i in range(len(is_pie))])
    write_csv(os.path.join(d, "pie_prevalence_ratio.csv"), ["class", "train_count", "ratio"],
              [[names[c], int(res["counts"][c]), p["ratio"][c]] for c in range(len(names))])
    write_csv(os.path.join(d, "pie_disease_counts.csv"),
              ["diseases", "pie_share", "non_pie_share"],
              [[b, a, c] for b, a, c in zip(p["diseases"]["bins"], p["diseases"]["pie"],
                                            p["diseases"]["non_pie"])])


def _figures(d, res):
    sp = res["sparsities"]
    fig, ax = new_figure(figsize=(6, 4))
    for kind, k in res["kinds"].items():
        mean, std = k["map"].mean(0), k["map"].std(0)
        ax.errorbar(sp, mean, yerr=std, marker="o", capsize=2, label=f"{kind} pruning")
    ax.set(xlabel="sparsity", ylabel="test mAP (mean ± std over runs)",
           title="mAP vs sparsity per prune type")
    ax.legend()
    save_figure(fig, os.path.join(d, "map_vs_sparsity.png"), dpi=120)

    for kind, k in res["kinds"].items():
        fig, ax = new_figure(figsize=(7, 4.5))
        lf = res["log_freq"]
        norm = matplotlib.colors.Normalize(lf.min(), lf.max())
        cmap = matplotlib.colormaps["viridis"]
        for c, _name in enumerate(res["class_names"]):
            ax.plot(sp, k["curves"]["ap"][:, c], color=cmap(norm(lf[c])), lw=1.2)
        ax.axhline(-0.2, color="red", ls="--", lw=0.8)
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                     label="log training frequency")
        ax.set(xlabel="sparsity", ylabel="median relative AP change",
               title=f"Forgettability curves per class ({kind} pruning)")
        save_figure(fig, os.path.join(d, f"forgettability_{kind}.png"), dpi=120)

        fig, axes = new_figure(2, 2, figsize=(10, 8))
        pr = k["pairs"]
        drop = np.array([np.nan if v is None else v for v in k["first_drop"]])
        panels = [(res["log_freq"], drop, "log train frequency", "first sparsity with 20% AP drop"),
                  (res["log_freq"], k["change"], "log train frequency",
                   "relative AP change at 95%"),
                  (pr["dlogfreq"], pr["fcd"], "|diff of log frequency|", "curve distance (FCD)"),
                  (pr["iou_quarter"], pr["fcd"], "IoU^(1/4)", "curve distance (FCD)")]
        for ax, (x, y, xl, yl), (rel, c) in zip(axes.ravel(), panels, k["corr"].items()):
            ax.scatter(x, y, s=14)
            ax.set(xlabel=xl, ylabel=yl,
                   title=f"{rel}\nr={c.pearson_r:.2f} (p={c.pearson_p:.2g}), "
                         f"rho={c.spearman_rho:.2f} (p={c.spearman_p:.2g})")
            ax.title.set_fontsize(8)
        fig.suptitle(f"Correlations ({kind} pruning)")
        save_figure(fig, os.path.join(d, f"correlations_{kind}.png"), dpi=120)

    p = res["pies"]
    order = np.argsort(-res["counts"])
    fig, ax = new_figure(figsize=(8, 4))
    ax.bar(range(len(order)), p["ratio"][order])
    ax.axhline(1.0, color="red", ls="--", lw=0.8)
    ax.set_xticks(range(len(order)), [res["class_names"][i] for i in order], rotation=70,
                  fontsize=7)
    ax.set(ylabel="prevalence in PIEs / in non-PIEs",
           title="PIE prevalence ratio per class (head -> tail)")
    save_figure(fig, os.path.join(d, "pie_prevalence_ratio.png"), dpi=120)

    fig, ax = new_figure(figsize=(5, 3.5))
    x = np.arange(5)
    ax.bar(x - 0.2, p["diseases"]["pie"], 0.4, label="PIEs")
    ax.bar(x + 0.2, p["diseases"]["non_pie"], 0.4, label="non-PIEs")
    ax.set_xticks(x, p["diseases"]["bins"])
    ax.set(xlabel="number of diseases per image", ylabel="share of images",
           title="Number of diseases: PIEs vs non-PIEs")
    ax.legend()
    save_figure(fig, os.path.join(d, "pie_disease_counts.png"), dpi=120)


def _record_position(source, index: int) -> int:
    """Position in `source` of the record whose stable `index` is given: table sources keep
    their ids (`ids`, e.g. after `subset`), the others number records by position."""
    ids = getattr(source, "ids", None)
    if ids is None:
        return int(index)
    return int(np.flatnonzero(np.asarray(ids) == index)[0])


def _pie_grid(path, res, ds, config):
    """The lowest-correlation PIEs with their labels (sweep rows are sorted by stable index)."""
    test = ds["test"]
    p = res["pies"]
    shown = p["indices"][: config.prunecxr.pie_grid]
    cols = 4
    rows = max(1, int(np.ceil(len(shown) / cols)))
    fig, axes = new_figure(rows, cols, figsize=(cols * 2.6, rows * 2.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, t in zip(axes.ravel(), shown):
        record = test[_record_position(test, res["index"][t])]
        img = decode_image(record["image"], size=(128, 128), channels=3)
        ax.imshow(img)
        names = [n for n, y in zip(res["class_names"], res["labels"][t]) if y > 0.5]
        ax.set_title("\n".join([", ".join(names[:3]) or "(none)",
                                f"rho={p['scores'][t]:.2f}"]), fontsize=7)
    fig.suptitle("Pruning-identified exemplars (dense vs 90% sparse ensembles)")
    save_figure(fig, path, dpi=110)


def _summary(d, res, config) -> dict:
    lines = ["# PruneCXR report", ""]
    sp = res["sparsities"]
    lines.append(f"{len(res['class_names'])} classes, {res['labels'].shape[0]} test images, "
                 f"{len(sp)} sparsities ({sp[0]:.2f} to {sp[-1]:.2f}), "
                 f"prune types: {', '.join(res['kinds'])}.")
    head = {}
    for kind, k in res["kinds"].items():
        runs = k["map"].shape[0]
        lines += ["", f"## {kind} pruning ({runs} runs)", "",
                  f"- dense mAP {k['map'][:, 0].mean():.4f} ± {k['map'][:, 0].std():.4f}; "
                  f"at {sp[-1]:.2f} sparsity {k['map'][:, -1].mean():.4f} ± "
                  f"{k['map'][:, -1].std():.4f}"]
        drops = [v for v in k["first_drop"] if v is not None]
        never = sum(v is None for v in k["first_drop"])
        lines.append(f"- first 20% AP drop between sparsity {min(drops):.2f} and {max(drops):.2f}"
                     + (f"; {never} class(es) never drop 20%" if never else "")
                     if drops else "- no class loses 20% of its AP")
        ch = k["change"]
        lo, hi = int(np.nanargmin(ch)), int(np.nanargmax(ch))
        lines.append(f"- relative AP change at {config.prunecxr.change_level:.2f}: from "
                     f"{ch[lo]:.2f} ({res['class_names'][lo]}) to {ch[hi]:.2f} "
                     f"({res['class_names'][hi]})")
        lines += ["", "| relation | r (p) | rho (p) | reference NIH r / rho | reference MIMIC "
                  "r / rho |", "|---|---|---|---|---|"]
        for rel, c in k["corr"].items():
            (nr, nrho), (mr, mrho) = TARGETS[rel]
            lines.append(f"| {rel} | {c.pearson_r:.2f} ({c.pearson_p:.2g}) | "
                         f"{c.spearman_rho:.2f} ({c.spearman_p:.2g}) | {nr} / {nrho} | "
                         f"{mr} / {mrho} |")
            head[f"{kind}/{rel}/pearson_r"] = c.pearson_r
            head[f"{kind}/{rel}/spearman_rho"] = c.spearman_rho
        head[f"{kind}/dense_map"] = float(k["map"][:, 0].mean())
    p = res["pies"]
    ratio = p["ratio"]
    order = np.argsort(res["counts"])
    tail, headc = order[: max(1, len(order) // 3)], order[-max(1, len(order) // 3):]
    lines += ["", "## Pruning-identified exemplars", "",
              f"- {len(p['indices'])} PIEs ({config.prunecxr.pie_fraction:.0%} of the test set): "
              f"lowest Spearman correlation between the dense and "
              f"{config.prunecxr.pie_level:.0%}-sparse ensembles ({p['kind']} pruning)",
              f"- mean prevalence ratio PIE / non-PIE: tail third {np.nanmean(ratio[tail]):.2f}, "
              f"head third {np.nanmean(ratio[headc]):.2f}",
              "- images with 0/1/2/3/4+ diseases: PIEs " +
              " / ".join(f"{v:.0%}" for v in p["diseases"]["pie"]) + "; non-PIEs " +
              " / ".join(f"{v:.0%}" for v in p["diseases"]["non_pie"]),
              "", "Figures: map_vs_sparsity.png, forgettability_<type>.png, "
              "correlations_<type>.png, pie_prevalence_ratio.png, pie_disease_counts.png, "
              "pie_grid.png. Tables: *.csv."]
    write_markdown(os.path.join(d, "summary.md"), lines)
    head["pie_ratio_tail"] = float(np.nanmean(ratio[tail]))
    head["pie_ratio_head"] = float(np.nanmean(ratio[headc]))
    return head
