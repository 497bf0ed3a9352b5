"""FoPro-KD's report: comparison.csv (means and _std over seeds), summary.md with the kit's
verdicts (`comparison.verdict`) and, where a KD method is not better, why; and figures:
per-class recall per method, tail accuracy per method, prompted examples with the learned
amplitude mask, and the teacher's frequency preference (feature similarity to the clean input,
and accuracy when its head has the data's classes, under low- and high-pass filtered inputs)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed import fourier
from jaxmed.data import augment, image_channels, image_size
from jaxmed.data.pipeline import Preprocess, eval_batches
from jaxmed.methods.fopro_kd import run, step
from jaxmed.report import new_figure, save_figure, write_csv, write_markdown
from jaxmed.train import comparison, sharding
from jaxmed.train.evaluate import predict

METRICS = ("test/balanced_accuracy", "test/f1_macro", "test/accuracy", "test/head_acc",
           "test/medium_acc", "test/tail_acc")
CUTOFFS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
BASELINE = "balanced_softmax"
# every method with a teacher, each judged against BASELINE (the order of the verdict lines)
KD_METHODS = ("ekd", "ekd_fpg", "ekd_fpg_adv", "hinton_kd", "balanced_kd", "feature_kd")


def _fmt(row, m):
    return f"{row[m]:.3f} ± {row[m + '_std']:.3f}"


def write_report(workdir: str, config, results, ds, teacher, mesh) -> dict:
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    summary = comparison.write_comparison(os.path.join(out, "comparison.csv"), results, METRICS)
    per_class_recall_figure(os.path.join(out, "per_class_recall.png"), results, ds.info)
    comparison.metric_by_method_figure(os.path.join(out, "tail_acc_by_method.png"), results,
                                       "test/tail_acc")
    lines = [f"# FoPro-KD comparison ({ds.info.name}, {len(config.kd.seeds)} seed(s))", "",
             "| method | seeds | " + " | ".join(m.split("/")[1] for m in METRICS) + " |",
             "|---" * (len(METRICS) + 2) + "|"]
    for method, row in summary.items():
        lines.append(f"| {method} | {row['seeds']} | "
                     + " | ".join(_fmt(row, m) for m in METRICS) + " |")
    teacher_acc = teacher_accuracy(teacher)
    lines += ["", f"Head / medium / tail: {_groups_text(config, ds.info)}.", ""]
    if teacher is not None:
        acc = ("n/a (a PyTorch teacher, or no result.json in its workdir)"
               if teacher_acc is None else f"{teacher_acc:.3f}")
        lines += [f"Teacher ({teacher.source}): test accuracy {acc}.", ""]
    lines += ["## Verdicts (tail accuracy)", "", comparison.RULE, ""]
    lines += verdict_lines(summary, config, ds.info, teacher_acc)
    prompt_runs = [m for m in step.PROMPTED if m in results]
    if prompt_runs:
        prompt_figure(os.path.join(out, "prompt_examples.png"), workdir, prompt_runs,
                      config, ds)
        lines += ["", "Prompted test images and the learned amplitude masks: "
                  "`prompt_examples.png`."]
    if teacher is not None:
        rows = teacher_frequency(teacher, config, ds, mesh)
        write_csv(os.path.join(out, "teacher_frequency.csv"),
                  ["filter", "cutoff", "feature_cosine", "accuracy"],
                  [[r["filter"], r["cutoff"], f"{r['cos']:.4f}", f"{r['acc']:.4f}"]
                   for r in rows])
        teacher_frequency_figure(os.path.join(out, "teacher_frequency.png"), rows)
        lines += ["", "## Teacher frequency preference (test images)", "",
                  "| filter | cutoff (x Nyquist) | feature cosine to clean | accuracy |",
                  "|---|---|---|---|"]
        lines += [f"| {r['filter']} | {r['cutoff']} | {r['cos']:.3f} | {r['acc']:.3f} |"
                  for r in rows]
    lines += ["", "Figures: `per_class_recall.png`, `tail_acc_by_method.png`"
              + (", `teacher_frequency.png`" if teacher is not None else "") + "."]
    write_markdown(os.path.join(out, "summary.md"), lines)
    return summary


def teacher_accuracy(teacher) -> float | None:
    """The teacher's test accuracy as its own run recorded it (`result.json` of a jaxmed
    workdir, e.g. the quick configs' teacher stage, which tests on the same test split); None
    for a PyTorch teacher or a workdir without a result."""
    if teacher is None or not os.path.isdir(str(teacher.source)):
        return None
    try:
        result = comparison.read_result(teacher.source)
    except ValueError as e:
        raise ValueError(f"{e} (the teacher's own result: without it the report gives no "
                         "teacher accuracy)") from None
    value = (result or {}).get("test/accuracy")
    return None if value is None else float(value)


def verdict_lines(summary, config, info, teacher_acc) -> list[str]:
    """One line per KD method against student-only balanced softmax on tail accuracy
    (`comparison.verdict_line`); where it is not better, a second line says why with the
    figures (both means ± std, seeds, teacher accuracy, the tail classes' training counts);
    where it is better but its balanced accuracy is worse (a model that gives up the other
    classes for the tail, as balanced KD on RetinaMNIST-LT), a caution line says so."""
    from jaxmed import metrics

    groups = metrics.class_groups(info.class_counts, tuple(config.kd.group_boundaries))
    tail = ", ".join(f"{info.class_names[c]} {int(info.class_counts[c])}"
                     for c in np.flatnonzero(groups == 2))
    t_acc = "n/a" if teacher_acc is None else f"{teacher_acc:.3f}"
    metric, lines = "test/tail_acc", []
    for method in KD_METHODS:
        if method not in summary or BASELINE not in summary:
            continue
        a, b = summary[method], summary[BASELINE]
        lines.append("- " + comparison.verdict_line(summary, method, BASELINE, metric))
        said = comparison.verdict(summary, method, BASELINE, metric)
        if said == comparison.BETTER:
            bal = "test/balanced_accuracy"
            if bal in a and bal in b and comparison.verdict(
                    summary, method, BASELINE, bal) == comparison.WORSE:
                lines.append("  - caution: the tail gain costs the other classes: "
                             + comparison.verdict_line(summary, method, BASELINE, bal))
            continue
        na, nb = (r.get(f"{metric}_n", r["seeds"]) for r in (a, b))
        gap = a[metric] - b[metric]
        why = {comparison.FEW: f"fewer than {comparison.MIN_SEEDS} seeds ({na} vs {nb})",
               comparison.NOISE: f"gap {gap:+.3f} within 2 standard errors of the difference",
               comparison.WORSE: f"tail accuracy lower ({a[metric]:.3f} vs {b[metric]:.3f}) "
                                 "beyond 2 standard errors"}[said]
        lines.append(f"  - why not: {why}; tail acc {method} {_fmt(a, metric)}, "
                     f"{BASELINE} {_fmt(b, metric)} over {na} / {nb} seeds; teacher test acc "
                     f"{t_acc}; tail training counts: {tail}")
    return lines


def _groups_text(config, info) -> str:
    from jaxmed import metrics

    g = metrics.class_groups(info.class_counts, tuple(config.kd.group_boundaries))
    names = ("head", "medium", "tail")
    return "; ".join(f"{names[k]} = " + ", ".join(
        f"{info.class_names[c]} ({int(info.class_counts[c])})" for c in np.flatnonzero(g == k))
        for k in range(3))


def per_class_recall_figure(path: str, results, info) -> None:
    order = np.argsort(-np.asarray(info.class_counts), kind="stable")
    methods = list(results)
    fig, ax = new_figure(figsize=(2 + 0.9 * len(order) * max(len(methods), 4) / 4, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [np.nanmean([r.get(f"test/recall/{info.class_names[c]}", np.nan)
                            for r in results[m]]) for c in order]
        ax.bar(np.arange(len(order)) + (i - (len(methods) - 1) / 2) * width, vals, width,
               label=m)
    ax.set_xticks(range(len(order)), [f"{info.class_names[c]}\n({int(info.class_counts[c])})"
                                      for c in order], fontsize=7)
    ax.set_ylabel("test recall (mean over seeds)")
    ax.set_xlabel("class (training count), head to tail")
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def _test_images(config, ds, n: int) -> np.ndarray:
    size, channels = image_size(config.data, ds.info), image_channels(config.data, ds.info)
    pre = Preprocess(size, channels, "", 0, config.data.on_error)
    src = ds["test"]
    return np.stack([pre(i, src[i])["image"] for i in range(min(n, len(src)))])


def _show(x):
    """Normalised images back to [0, 1] for display."""
    mean, std = np.asarray(augment.IMAGENET_MEAN), np.asarray(augment.IMAGENET_STD)
    if x.shape[-1] != 3:
        mean, std = mean.mean(), std.mean()
    return np.clip(x * std + mean, 0, 1)


def prompt_figure(path: str, workdir: str, methods, config, ds) -> None:
    """Per FPG method (first seed): clean and prompted test images, and log m (fftshift-ed,
    channel mean)."""
    n = config.kd.report_examples
    images = np.asarray(augment.normalize(_test_images(config, ds, n)))
    fig, axes = new_figure(2 * len(methods), n + 1, figsize=(1.5 * (n + 1), 3 * len(methods)),
                           squeeze=False)
    beta = config.kd.fpg.beta
    window = None if beta >= 1 else fourier.low_frequency_window(images.shape[1],
                                                                 images.shape[2], beta)
    for k, m in enumerate(methods):
        d = comparison.run_dir(workdir, m, config.kd.seeds[0])
        f = os.path.join(d, "prompt.npz")
        if not os.path.exists(f):
            continue
        shape = fourier.init_prompt(images.shape[1], images.shape[2], images.shape[3])
        z = run.read_npz(f, {"log_mask": shape["log_mask"].shape},
                         f"and {os.path.join(d, comparison.RESULT)}: the rerun writes it again "
                         "from the run's last checkpoint")
        prompt = {"log_mask": jnp.asarray(z["log_mask"])}
        prompted = np.asarray(fourier.apply_prompt(prompt, jnp.asarray(images), window))
        for j in range(len(images)):
            for r, img in ((0, images[j]), (1, prompted[j])):
                ax = axes[2 * k + r, j]
                ax.imshow(_show(img).squeeze())
                ax.set_axis_off()
                if j == 0:
                    ax.set_title(f"{m}: {'clean' if r == 0 else 'prompted'}", fontsize=7,
                                 loc="left")
        mask = np.log(np.asarray(fourier.amplitude_mask(prompt, window)).mean(-1))
        ax = axes[2 * k, n]
        im = ax.imshow(np.fft.fftshift(mask, axes=0), cmap="coolwarm",
                       vmin=-np.abs(mask).max() - 1e-6, vmax=np.abs(mask).max() + 1e-6)
        ax.set_title("log mask (ky centred, kx >= 0)", fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
        axes[2 * k + 1, n].set_axis_off()
    save_figure(fig, path)


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _filtered_response(model, size, variables, images, cutoff, keep):
    """Teacher (logits, cos(features(filtered), features(clean))) on a batch."""
    clean = step.teacher_outputs(model, size, variables, images)[1]
    x = fourier.radial_filter(images, cutoff, keep)
    logits, feats = step.teacher_outputs(model, size, variables, x)
    cos = jnp.sum(feats * clean, -1) / jnp.maximum(
        jnp.linalg.norm(feats, axis=-1) * jnp.linalg.norm(clean, axis=-1), 1e-12)
    return logits, cos


def teacher_frequency(teacher, config, ds, mesh, max_images: int = 256) -> list[dict]:
    """Feature cosine (filtered vs clean) and accuracy (if the teacher's head has the data's
    classes; else NaN) under low- and high-pass filtered test images."""
    size, channels = image_size(config.data, ds.info), image_channels(config.data, ds.info)
    src = ds["test"]
    from jaxmed.data.sources import SubsetSource

    sub = SubsetSource(src, np.arange(min(max_images, len(src))))
    variables = jax.device_put(teacher.variables, sharding.replicated(mesh))
    # the test subset decoded once for all 13 (filter, cutoff) passes
    batches = list(eval_batches(sub, global_batch=config.train.eval_batch_size,
                                preprocess=Preprocess(size, channels, "", 0, config.data.on_error)))
    rows = []
    for keep in ("low", "high"):
        for cutoff in CUTOFFS:
            if keep == "high" and cutoff >= 1.0:
                continue

            def fn(b, keep=keep, cutoff=cutoff):
                x = augment.normalize(b["image"])
                logits, cos = _filtered_response(teacher.model, teacher.image_size, variables,
                                                 x, jnp.float32(cutoff), keep)
                return {"logits": logits, "cos": cos}

            out = predict(fn, batches, mesh, keys=("index", "label"))
            acc = (float(np.mean(out["logits"].argmax(-1) == out["label"]))
                   if teacher.num_classes == ds.info.num_classes else float("nan"))
            rows.append({"filter": f"{keep}-pass", "cutoff": cutoff,
                         "cos": float(np.mean(out["cos"])), "acc": acc})
    return rows


def teacher_frequency_figure(path: str, rows) -> None:
    fig, axes = new_figure(1, 2, figsize=(8, 3.4))
    for keep, style in (("low-pass", "o-"), ("high-pass", "s--")):
        sel = [r for r in rows if r["filter"] == keep]
        x = [r["cutoff"] for r in sel]
        axes[0].plot(x, [r["cos"] for r in sel], style, label=keep)
        axes[1].plot(x, [r["acc"] for r in sel], style, label=keep)
    axes[0].set_ylabel("teacher feature cosine to clean")
    axes[1].set_ylabel("teacher accuracy (own head)")
    for ax in axes:
        ax.set_xlabel("cutoff radius (x Nyquist)")
        ax.legend(fontsize=7)
    fig.suptitle("Teacher's frequency preference: low-pass keeps r <= cutoff, "
                 "high-pass keeps r > cutoff", fontsize=8)
    save_figure(fig, path)
