"""BiasPruner: bias scores vs numpy, earlier tasks bitwise frozen, entropy selection, fairness
and continual metrics vs hand-computed values, 8-device inference equal to 1-device, the whole
comparison end to end."""

import copy
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import metrics
from jaxmed.methods import biaspruner
from jaxmed.methods.biaspruner import baselines, frame, subnetworks
from jaxmed.methods.biaspruner import run as bp_run
from jaxmed.methods.biaspruner.tasks import build_tasks
from jaxmed.models.common import sown
from jaxmed.pruning import structured
from tests.conftest import REPO, run_python


def _config(name: str, arg: str = ""):
    """configs/biaspruner/<name>.py's config (loaded by path, as jaxmed --config does)."""
    spec = importlib.util.spec_from_file_location(
        f"bp_{name}", os.path.join(REPO, "configs", "biaspruner", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ------------------------------------------------------------------------------ metrics
def test_fairness_matches_hand_computed_values():
    #            group 0: 4 samples         group 1: 4 samples
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    p = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    a = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    f = metrics.fairness(y, p, a)
    # group 0: TPR 1/2, TNR 2/2, P(pred 1) 1/4; group 1: TPR 2/2, TNR 1/2, P(pred 1) 3/4
    assert f["eopp1"] == pytest.approx(0.5) and f["eopp0"] == pytest.approx(0.5)
    assert f["eodd"] == pytest.approx(0.5 + 0.5)  # TPR gap + FPR gap (sum convention)
    assert f["dp_ratio"] == pytest.approx((1 / 4) / (3 / 4))
    assert f["accuracy_group0"] == pytest.approx(3 / 4)
    assert f["accuracy_group1"] == pytest.approx(3 / 4)
    assert f["balanced_accuracy_group0"] == pytest.approx((0.5 + 1.0) / 2)
    unknown = metrics.fairness(np.r_[y, 1], np.r_[p, 0], np.r_[a, -1])  # -1: ignored
    assert unknown == f


def test_continual_summary_hand_computed():
    r = np.array([[0.9, np.nan, np.nan],
                  [0.7, 0.8, np.nan],
                  [0.6, 0.75, 0.85]])
    s = metrics.continual_summary(r)
    assert s["acc"] == pytest.approx((0.6 + 0.75 + 0.85) / 3)
    assert s["bwt"] == pytest.approx(((0.6 - 0.9) + (0.75 - 0.8)) / 2)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.75)) / 2)


def test_entropy_selection_picks_the_confident_subnetwork():
    # 3 tasks with 2, 3 and 2 classes; C_max = 3.
    cmask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]], bool)
    flat = [0.0, 0.0, 0.0]
    sharp = [6.0, -6.0, 0.0]
    logits = jnp.array([
        [flat, [8.0, 0.0, 0.0], flat],   # sample 0: task 1 is confident
        [sharp, flat, flat],             # sample 1: task 0
        [flat, flat, sharp],             # sample 2: task 2 ...
        [flat, flat, sharp],             # sample 3: ... but only tasks 0, 1 are stored
    ])
    logits = jnp.where(cmask[None], logits, frame.NEG)
    valid = jnp.array([True, True, True])
    np.testing.assert_array_equal(frame.select_task(logits, cmask, valid)[:3], [1, 0, 2])
    only_two = jnp.array([True, True, False])
    assert int(frame.select_task(logits, cmask, only_two)[3]) in (0, 1)
    # Normalisation by log(C_t): a uniform 3-class and a uniform 2-class prediction tie at 1.
    ent = frame.normalized_entropy(jnp.where(cmask[None], 0.0, frame.NEG)[:1], cmask)
    np.testing.assert_allclose(ent[0], [1.0, 1.0, 1.0], rtol=1e-6)


# ------------------------------------------------------------------------- the learner
@pytest.fixture(scope="module")
def seq():
    cfg = _config("quick", "tiny")
    tasks, info = build_tasks(cfg)
    return frame.TaskSequence(cfg, tasks, info)


def _unit_layer(params, stats, x):
    """layer1_0/conv1's post-ReLU output written with lax convolutions and numpy BN."""
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(x, p, s):
        return (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]

    h = np.maximum(bn(np.asarray(conv(x, params["conv1"]["kernel"])), params["bn1"],
                      stats["bn1"]), 0)
    blk, bst = params["layer1_0"], stats["layer1_0"]
    return np.maximum(bn(np.asarray(conv(h, blk["conv1"]["kernel"])), blk["bn1"], bst["bn1"]), 0)


def test_bias_scores_equal_numpy(seq):
    from jaxmed.data import augment
    setup, state = subnetworks.init(seq, "bias")
    rng = np.random.default_rng(0)
    params = {"backbone": jax.tree.map(lambda v: v + 0.05 * rng.normal(size=v.shape).astype(
        v.dtype), state.backbone), "heads": state.heads}
    stats = jax.tree.map(lambda x: x[0], state.task_stats)
    cmask = frame.class_mask(seq.tasks, seq.num_tasks, seq.max_classes)
    source = seq.tasks[0].splits["train"]
    scores = subnetworks.score_pass(seq, setup, params, stats, 0, cmask, source)["scores"]

    acts, correct = {}, []
    for b in seq.batches(source):
        keep = np.asarray(b["valid"], bool)
        x = augment.normalize(jnp.asarray(b["image"]))
        (_, feats), inter = setup.model.apply(
            {"params": params["backbone"], "batch_stats": stats}, x, train=False,
            features=True, mutable=["intermediates"])
        a = sown(inter["intermediates"])
        manual = _unit_layer(params["backbone"], stats, np.asarray(x))
        np.testing.assert_allclose(np.asarray(a["layer1_0/conv1"]), manual, atol=1e-4)
        logits = np.asarray(feats) @ np.asarray(params["heads"]["kernel"][0]) + np.asarray(
            params["heads"]["bias"][0])
        correct.append((logits[:, :2].argmax(1) == np.asarray(b["label"]))[keep])
        for k, v in a.items():
            acts.setdefault(k, []).append(np.asarray(v)[keep])
    correct = np.concatenate(correct)
    assert 0 < correct.sum() < correct.size  # both groups present
    for k, v in acts.items():
        v = np.concatenate(v)
        want = np.zeros(v.shape[-1])
        for c in range(v.shape[-1]):
            per = [v[i, :, :, c].mean() for i in range(len(v))]
            want[c] = (np.mean([p for p, ok in zip(per, correct) if ok])
                       - np.mean([p for p, ok in zip(per, correct) if not ok]))
        np.testing.assert_allclose(scores[k], want, rtol=1e-4, atol=1e-6)


def test_bn_selection_scores_the_stem_input_under_each_tasks_statistics(seq):
    """`task_selection='bn'`: each task's score is the Gaussian NLL of the stem convolution's
    output under that task's stored stem statistics (scipy oracle); the best-fitting task is
    chosen, whatever the entropies say."""
    from scipy import stats as st

    from jaxmed.data import augment
    setup, state = subnetworks.init(seq, "bias")
    images = next(iter(seq.batches(seq.tasks[1].splits["test"])))["image"]
    _, inter = setup.model.apply(
        {"params": state.backbone, "batch_stats": jax.tree.map(lambda x: x[0], state.task_stats)},
        augment.normalize(images), train=False, capture_intermediates=True,
        mutable=["intermediates"])
    h = np.asarray(inter["intermediates"]["conv1"]["__call__"][0], np.float64)
    fit = (h.mean((0, 1, 2)), h.var((0, 1, 2)))  # the statistics of these very images
    off = (fit[0] + 1.5, fit[1] * 3.0)
    for fitting in (1, 0):  # plant the fitting statistics on task 1, then on task 0
        stem = state.task_stats["bn1"]
        for t, (m, v) in enumerate([off, fit] if fitting else [fit, off]):
            stem["mean"][t], stem["var"][t] = m, v
        s = seq.replicate(state)
        _, nll = subnetworks.all_logits(s, images, model=setup.model, task_axis="map",
                                        packnet=False)
        for t in range(2):
            m, v = np.asarray(state.task_stats["bn1"]["mean"][t], np.float64), np.asarray(
                state.task_stats["bn1"]["var"][t], np.float64)
            want = -st.norm.logpdf(h, m, np.sqrt(v + 1e-5)).mean((1, 2, 3)) - 0.5 * np.log(
                2 * np.pi)
            np.testing.assert_allclose(np.asarray(nll)[:, t], want, rtol=1e-4, atol=1e-4)
        valid = seq.replicate(np.ones(2, bool))
        by_bn = subnetworks.predict_batch(s, {"image": images}, valid, model=setup.model,
                                          task_axis="map", packnet=False, by_bn=True)
        assert np.mean(np.asarray(by_bn["task"]) == fitting) > 0.9
        np.testing.assert_array_equal(by_bn["task_entropy"], frame.select_task(
            subnetworks.all_logits(s, images, model=setup.model, task_axis="map",
                                   packnet=False)[0], s.cmask, valid))


@pytest.mark.parametrize("selection", ["bias", "packnet"])
def test_earlier_tasks_are_bitwise_frozen(seq, tmp_path, selection):
    from jaxmed.pruning.masks import apply_masks
    setup, state = subnetworks.init(seq, selection)
    programs = subnetworks.train_step._cache_size()
    state = subnetworks.train_task(seq, setup, state, 0, str(tmp_path / "t0"))
    before = jax.tree.map(np.copy, subnetworks.subset(state.backbone,
                                                       subnetworks.is_shared_kernel))
    owner0 = jax.tree.map(lambda o: o == 0, state.owner)
    bn0, stats0 = jax.tree.map(lambda x: np.copy(x[0]), (state.task_bn, state.task_stats))
    head0 = np.asarray(state.heads["kernel"][0]).copy()
    images = next(iter(seq.batches(seq.tasks[0].splits["test"])))["image"]
    packnet = selection == "packnet"

    def logits(s, axis="map"):
        return np.asarray(subnetworks.all_logits(seq.replicate(s), images, model=setup.model,
                                                 task_axis=axis, packnet=packnet)[0])

    logits0 = logits(state)[:, 0]
    assert sum(int(np.sum(o)) for o in jax.tree.leaves(owner0)) > 0

    state = subnetworks.train_task(seq, setup, state, 1, str(tmp_path / "t1"))
    after = subnetworks.subset(state.backbone, subnetworks.is_shared_kernel)
    changed_free = []

    def check(o, a, b):
        np.testing.assert_array_equal(np.asarray(b)[o], np.asarray(a)[o])  # bitwise
        changed_free.append(int(np.sum(np.asarray(b)[~o] != np.asarray(a)[~o])))

    jax.tree.map(check, owner0, before, after)
    # One program per loss (GCE, CE) for both phases of both tasks.
    assert subnetworks.train_step._cache_size() - programs == (2 if selection == "bias" else 1)
    assert len(changed_free) > 5 and sum(changed_free) > 0  # task 1 did train something
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[0], state.task_bn), bn0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[0], state.task_stats),
                 stats0)
    np.testing.assert_array_equal(state.heads["kernel"][0], head0)
    np.testing.assert_array_equal(logits(state)[:, 0], logits0)
    if selection == "bias":  # never empties a unit group; task 1 owns new units
        for t in (0, 1):
            assert all(m[t].sum() >= 1 for m in subnetworks.units_of(state.channel).values())
        report = subnetworks.mask_report(state, selection)
        assert report["owned"][1] > 0 and report["kept"][0] < report["total"]
        # All subnetworks in one program ('vmap' and 'map' over tasks) equal each task's own
        # masked forward pass.
        from jaxmed.data import augment
        x = augment.normalize(jnp.asarray(images))
        cmask = frame.class_mask(seq.tasks, seq.num_tasks, seq.max_classes)
        for t in (0, 1):
            at = lambda tree: jax.tree.map(lambda v: v[t], tree)  # noqa: E731
            p = apply_masks(subnetworks.with_bn(state.backbone, at(state.task_bn)),
                            subnetworks.task_masks(state.backbone, at(state.channel),
                                                   state.owner, t, False))
            _, f = setup.model.apply({"params": p, "batch_stats": at(state.task_stats)}, x,
                                     train=False, features=True)
            want = np.asarray(f, np.float32) @ np.asarray(state.heads["kernel"][t]) + \
                np.asarray(state.heads["bias"][t])
            for axis in ("vmap", "map"):
                got = logits(state, axis)[:, t]
                np.testing.assert_allclose(got[:, cmask[t]], want[:, cmask[t]], rtol=1e-4,
                                           atol=1e-4)


@pytest.mark.parametrize("kind", ["ewc", "lwf"])
def test_shared_baselines_compile_each_step_once(seq, tmp_path, kind):
    setup, state = baselines.init(seq, kind)
    programs = baselines.train_step._cache_size()
    for t in range(seq.num_tasks):
        state = baselines.train_task(seq, setup, state, t, str(tmp_path / f"t{t}"))
    assert baselines.train_step._cache_size() - programs == 1
    if kind == "ewc":
        assert sum(float(np.sum(f)) for f in jax.tree.leaves(state.fisher)) > 0


def test_channel_ownership_rule():
    from jaxmed.train import build
    model = build.build_model(biaspruner.default_config().model, 2)  # resnet56
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v["params"])
    units = structured.resnet_units(params)
    channel = {u.name: np.arange(u.width) % 2 == 0 for u in units}
    keep = subnetworks.kept_weights(params, channel)
    assert keep["conv1"]["kernel"].all()  # the stem has no unit: always kept
    k1 = keep["layer1_0"]["conv1"]["kernel"]
    k2 = keep["layer1_0"]["conv2"]["kernel"]
    np.testing.assert_array_equal(k1[0, 0, 0], np.arange(16) % 2 == 0)
    np.testing.assert_array_equal(k2[0, 0, :, 0], np.arange(16) % 2 == 0)


# ---------------------------------------------------------------------------- end to end
def test_comparison_end_to_end(tmp_path):
    cfg = _config("quick", "tiny")
    methods = ("biaspruner", "packnet", "finetune", "joint", "ewc", "lwf", "lff")
    cfg.continual.methods = methods[:-1]
    first = biaspruner.train_and_evaluate(cfg, str(tmp_path))
    run = tmp_path / "runs" / "biaspruner" / "seed_0"
    saved = run / "tasks" / "2"  # orbax: the state after task 1
    stamp = os.path.getmtime(saved)
    # A method added to a finished comparison runs alone; the finished runs are read back.
    cfg.continual.methods = methods
    result = biaspruner.train_and_evaluate(cfg, str(tmp_path))
    assert os.path.getmtime(saved) == stamp
    assert result["biaspruner/test/acc"] == pytest.approx(first["biaspruner/test/acc"])
    for m in methods:
        acc, aligned, conflicting = (result[f"{m}/test/{k}"]
                                     for k in ("acc", "acc_aligned", "acc_conflicting"))
        assert 0 <= acc <= 1 and f"{m}/test/eodd" in result
        # the unbiased test set is half bias-aligned, half conflicting: acc is their mix
        assert min(aligned, conflicting) - 1e-9 <= acc <= max(aligned, conflicting) + 1e-9
    d = tmp_path / "report"
    for name in ("report.md", "comparison.csv", "runs.csv", "fairness.csv", "subnetworks.csv",
                 "accuracy_matrices.png", "acc_vs_eodd.png", "aligned_vs_conflicting.png",
                 "acc_by_method.png"):
        assert (d / name).stat().st_size > 0, name
    md = (d / "report.md").read_text()
    assert "- vs finetune: final ACC" in md and "lff" in md
    header = (d / "comparison.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["method", "seeds", "test/acc", "test/acc_std"]  # the contract
    vs = [x for x in md.splitlines() if x.startswith("- vs ")]
    assert len(vs) == 6 and all(x.count(": too few seeds") == 3 for x in vs)  # one seed
    res = bp_run.load_result(str(run))
    agnostic = res["details"]["agnostic"]
    assert np.isnan(agnostic[0, 1])  # task 1 not evaluated before it is learned
    assert res["test/acc"] == pytest.approx(agnostic[1].mean())
    # The sub-run's own metrics.jsonl: each task's accuracy at step = tasks trained so far,
    # the summary after the last; nothing at invented steps in the comparison's workdir.
    steps = {}
    for line in open(run / "metrics.jsonl"):
        row = json.loads(line)
        steps.setdefault(row.pop("step"), {}).update(row)
    assert sorted(steps) == [1, 2] and set(steps[1]) == {"test/acc_task0"}
    assert steps[1]["test/acc_task0"] == pytest.approx(agnostic[0, 0])
    assert steps[2]["test/acc_task1"] == pytest.approx(agnostic[1, 1])
    assert steps[2]["test/acc"] == pytest.approx(res["test/acc"])
    assert not (tmp_path / "metrics.jsonl").exists()
    # An unreadable per-task state (a truncated file) of an unfinished sub-run: set aside with
    # a warning, that task trains again (its phases resume from their own checkpoints), and
    # the sub-run ends with the same figures, each metrics.jsonl step written once.
    ft = tmp_path / "runs" / "finetune" / "seed_0"
    files = [p for p in (ft / "tasks" / "2").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    (ft / "result.json").unlink()
    again = biaspruner.train_and_evaluate(cfg, str(tmp_path))
    assert (ft / "tasks.unreadable" / "2").is_dir() and (ft / "tasks" / "2").is_dir()
    assert again["finetune/test/acc"] == pytest.approx(result["finetune/test/acc"], abs=1e-9)
    steps = [json.loads(line)["step"] for line in open(ft / "metrics.jsonl")]
    assert steps == [1, 2, 2]  # task accuracies at 1 and 2, the summary at 2


def test_unknown_sensitive_attribute_fails_naming_the_key(tmp_path):
    cfg = _config("quick", "tiny")
    cfg.continual.sensitive_attr = "skin_type"
    with pytest.raises(ValueError, match=r"sensitive_attr='skin_type'.*\['bias', 'aligned'\]"):
        biaspruner.train_and_evaluate(cfg, str(tmp_path))
    cfg = _config("quick", "tiny")
    cfg.continual.seeds = (0, 0)
    with pytest.raises(ValueError, match=r"config.continual.seeds=\(0, 0\) repeats a seed"):
        biaspruner.train_and_evaluate(cfg, str(tmp_path / "b"))


def test_report_verdicts_weigh_the_spread_over_seeds():
    """Means and standard errors against numpy; every verdict is `comparison.verdict`'s: a lead
    within two standard errors of the difference is within noise, one beyond is better, and
    fewer than three seeds give none."""
    from jaxmed.methods.biaspruner import report

    def runs(accs, eodds, sels=(0.9, 0.9, 0.9)):
        return [{"test/acc": a, "test/acc_conflicting": a - 0.1, "test/eodd": e,
                 "test/task_selection": sel} for a, e, sel in zip(accs, eodds, sels)]

    results = {"biaspruner": runs([0.80, 0.82, 0.84], [0.20, 0.25, 0.30]),
               "finetune": runs([0.55, 0.70, 0.85], [1.0, 1.2, 1.4]),   # noisy: within 2 SE
               "packnet": runs([0.70, 0.71, 0.72], [0.9, 1.0, 1.1])}    # tight: beaten
    summary = report.summarize(results)
    assert summary["biaspruner"]["test/acc"] == pytest.approx(0.82)
    assert summary["finetune"]["test/acc_se"] == pytest.approx(
        np.std([.55, .7, .85], ddof=1) / 3**.5)
    lines = report.verdicts(summary, num_tasks=2)
    ft = next(x for x in lines if x.startswith("- vs finetune"))
    pn = next(x for x in lines if x.startswith("- vs packnet"))
    # finetune: gap 0.12 < 2 hypot(0.012, 0.087) = 0.175; packnet: 0.11 > 2 hypot(0.012, 0.006)
    assert "final ACC 0.820 ± 0.012 vs 0.700 ± 0.087: within noise" in ft
    assert "final ACC 0.820 ± 0.012 vs 0.710 ± 0.006: better" in pn
    assert "EOdd 0.250 ± 0.029 vs 1.200 ± 0.115: better" in ft  # lower is better
    assert "EOdd, lowest first (continual methods, joint excluded): biaspruner" in lines[-2]
    assert "task selection 0.900 ± 0.000 (chance 0.50): above chance" in lines[-1]
    noisy = report.summarize({"biaspruner": runs([0.8] * 3, [0.2] * 3, (0.3, 0.9, 0.6))})
    assert "(chance 0.50): not above chance" in report.verdicts(noisy, 2)[-1]
    two = report.summarize({"biaspruner": runs([0.9, 0.91], [0.1, 0.11]),
                            "finetune": runs([0.1, 0.11], [2.0, 2.1])})
    assert all(x.count("too few seeds") == 3 for x in report.verdicts(two, 2)
               if x.startswith("- vs"))
    assert report.verdicts(two, 2)[-1].endswith(
        "(chance 0.50): too few seeds (the mean beyond 2 SE above chance, >= 3 seeds)")


def test_tasks_from_reference_split_files(shared_dir, tmp_path):
    """Fitzpatrick's biased and flipped reference splits as a two-task sequence."""
    from jaxmed.data.datasets.skin import biased_split_files
    from tests.data_helpers import csv_rows, head_file, write_image

    src = os.path.join(shared_dir, "splits", "biaspruner", "fitz")
    files = []
    for name in ("fitz_biased_train_set_split.csv", "flipped_total_biased_train_set_split.csv"):
        for p in biased_split_files(os.path.join(src, name)).values():
            local = head_file(p, str(tmp_path / "splits" / os.path.basename(p)), 12)
            for i, r in enumerate(csv_rows(local)):
                write_image(str(tmp_path / "img" / (r["md5hash"] + ".jpg")), i)
        files.append(str(tmp_path / "splits" / name))
    cfg = _config("fitzpatrick")
    cfg.data.root = str(tmp_path / "img")
    cfg.continual.task_split_files = tuple(files)
    tasks, info = build_tasks(cfg)
    assert [t.class_ids for t in tasks] == [[0, 1], [0, 1]]  # same classes: shared ids
    rec = tasks[1].splits["test"][0]
    assert rec["attrs"]["task"] == 1 and "skin_group" in rec["attrs"]
    assert len(tasks[0].splits["train"]) == 12


def test_eight_devices_match_one_device(tmp_path):
    """Task-agnostic inference on 8 (fake CPU) devices: the batches fed to the jitted inference
    are sharded over all 8, the subnetworks replicated, and predictions, logits and accuracies
    equal those on one device; one program per mesh."""
    out = tmp_path / "sharded.npz"
    run_python(["tests/scripts/biaspruner_sharded_inference.py", str(out)], devices=8)
    z = np.load(out)
    assert int(z["devices"]) == 8
    assert set(z["all_image_devices"]) == {8} and set(z["all_image_spec"]) == {"P('data',)"}
    assert set(z["all_state_devices"]) == {8} and z["all_state_replicated"].all()
    assert set(z["one_image_devices"]) == {1}
    for k in ("task", "pred", "index"):
        np.testing.assert_array_equal(z[f"all_{k}"], z[f"one_{k}"])
    assert len(set(z["all_task"])) == 2 and len(set(z["all_pred"])) == 2  # not degenerate
    np.testing.assert_allclose(z["all_logits"], z["one_logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z["all_stem_nll"], z["one_stem_nll"], rtol=1e-5, atol=1e-5)
    assert np.ptp(z["all_stem_nll"], axis=1).min() > 0  # the tasks' statistics differ
    for k in z.files:
        if k.startswith("all_aware_") or k.startswith("all_acc_"):
            np.testing.assert_array_equal(z[k], z["one_" + k[4:]])
    assert int(z["compiles"]) == 2 and int(z["logit_compiles"]) == 2


# ------------------------------------------------------------------- debiasing mechanics
def _colour_images(n_red: int, n_green: int, size: int, rng):
    img = np.zeros((n_red + n_green, size, size, 3), np.float32)
    img[:n_red, ..., 0] = 230
    img[n_red:, ..., 1] = 230
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_biaspruner_prunes_the_units_that_fire_on_bias_aligned_samples(seq):
    """A hand-built ResNet-8 whose prediction follows a shortcut (red -> class 0): red images
    of class 0 are bias-aligned (right), green ones conflicting (wrong). Planted units fire
    only on red, 'anti' units only on green, the rest never. The jitted scoring pass on the
    model's own split, then the ranking, must remove exactly the planted units."""
    from jaxmed.data.sources import ArraySource, TaskSource
    setup, state = subnetworks.init(seq, "bias")
    flat = subnetworks._flat(jax.tree.map(np.zeros_like, state.backbone))
    for k in flat:  # BN: identity (scale 1, bias 0; init statistics mean 0, var 1)
        if k.endswith("scale"):
            flat[k] = np.ones_like(flat[k])
    flat["conv1/kernel"][1, 1, 0, 0], flat["conv1/kernel"][1, 1, 1, 0] = 1.0, -1.0  # red - green
    planted = {"layer1_0/conv1": [1, 3], "layer3_0/conv1": [5]}
    anti = {"layer1_0/conv1": [0], "layer2_0/conv1": [2], "layer3_0/conv1": [9]}
    for unit, chans in planted.items():  # read every stream channel (only the red one is live)
        for c in chans:
            flat[f"{unit}/kernel"][1, 1, :, c] = 3.0
    for unit, chans in anti.items():  # relu(1 - 3 red): fires when the red channel is off
        bn = unit.replace("conv1", "bn1")
        for c in chans:
            flat[f"{unit}/kernel"][1, 1, :, c] = -3.0
            flat[f"{bn}/bias"][c] = 1.0
    backbone = subnetworks._unflat(flat)  # conv2 = 0: every residual branch adds nothing
    heads = jax.tree.map(np.zeros_like, state.heads)
    heads["kernel"][0, :, 0] = 50.0  # class 0 iff the pooled red channel > 0.02
    heads["bias"][0, 0] = -1.0
    rng = np.random.default_rng(0)
    images = _colour_images(24, 8, seq.image_shape[0], rng)
    source = TaskSource(ArraySource(images, np.zeros(32, np.int64)), 0, {0: 0})
    stats = jax.tree.map(lambda x: x[0], state.task_stats)
    scored = subnetworks.score_pass(seq, setup, {"backbone": backbone, "heads": heads}, stats,
                                    0, seq.cmask, source)
    np.testing.assert_array_equal(scored["correct"], np.arange(32) < 24)  # red: aligned
    assert scored["counts"] == (24, 8)
    n_planted = sum(len(c) for c in planted.values())
    total = sum(v.size for v in scored["scores"].values())
    kept = subnetworks.keep_units("bias", n_planted / total, scored["scores"], backbone)
    removed = {k: sorted(np.flatnonzero(~m).tolist()) for k, m in kept.items() if (~m).any()}
    assert removed == planted
    for unit, chans in anti.items():  # the most bias-conflicting units are kept
        assert kept[unit][chans].all()


def test_gce_model_finds_the_bias_conflicting_samples(tmp_path):
    """One task of the synthetic biased sequence with a noisy outline and 15% of the images
    bias-conflicting: after a short GCE phase the samples the biased model gets wrong are
    (mostly) the conflicting ones, which is what BiasPruner's scores and LfF's weights need."""
    cfg = _config("quick", "tiny")
    s = cfg.data.synthetic_bias
    s.num_tasks, s.num_train, s.bias_rate, s.noise = 1, 256, 0.85, 60.0
    s.shape_noise, cfg.data.train_augment = 0.0, ""  # the setting this was written for
    cfg.continual.tasks = ((0, 1),)
    cfg.continual.biased_epochs = 4
    tasks, info = build_tasks(cfg)
    seq1 = frame.TaskSequence(cfg, tasks, info)
    setup, state = subnetworks.init(seq1, "bias")
    s0 = jax.device_get(state)
    params = {"backbone": subnetworks.with_bn(s0.backbone, jax.tree.map(lambda x: x[0],
                                                                        s0.task_bn)),
              "heads": s0.heads}
    stats = jax.tree.map(lambda x: x[0], s0.task_stats)
    source = tasks[0].splits["train"]
    ones = np.ones(seq1.index_bound, np.float32)
    everything = jax.tree.map(lambda x: np.ones(np.shape(x), bool), params["backbone"])
    phase = seq1.replicate(subnetworks.Phase(
        subnetworks.trainable_masks(params["backbone"], s0.owner, subnetworks.FREE, 0, 1),
        everything, ones, np.int32(0), s0.cmask))
    step = functools.partial(subnetworks.train_step, phase=phase, model=setup.model,
                             tx=setup.tx, gce_q=setup.gce_q, mesh=seq1.mesh)
    ts = frame.run_phase(seq1, str(tmp_path / "gce"),
                             frame.state_from(params, stats, setup.tx,
                                                  jax.random.PRNGKey(0)),
                             step, source, 4, 0)
    params, stats = jax.device_get((ts.params, ts.batch_stats))
    scored = subnetworks.score_pass(seq1, setup, params, stats, 0, s0.cmask, source)
    conflicting = np.array([source[i]["attrs"]["aligned"] == 0 for i in range(len(source))])
    found = ~scored["correct"][np.argsort(scored["index"])]
    assert conflicting.sum() > 20
    recall = (found & conflicting).sum() / conflicting.sum()
    precision = (found & conflicting).sum() / max(found.sum(), 1)
    assert recall > 0.8 and precision > 0.8, (recall, precision)


def _lff_reference(batches, labels, num_slots, alpha):
    """The LfF code (EMA.update, EMA.max_loss, the class-wise normalisation, the weight) in
    numpy, batch by batch; padding rows (valid False) skipped."""
    mem = {"b": np.zeros(num_slots), "d": np.zeros(num_slots)}
    seen = np.zeros(num_slots)
    out = []
    for index, y, loss_b, loss_d, valid in batches:
        idx = index[valid]
        for key, loss in (("b", loss_b), ("d", loss_d)):
            m = mem[key]
            m[idx] = alpha * m[idx] + (1 - alpha * seen[idx]) * loss[valid]
        seen[idx] = 1
        lb, ld = mem["b"][index].copy(), mem["d"][index].copy()
        for c in (0, 1):
            lb[y == c] /= mem["b"][labels == c].max()
            ld[y == c] /= mem["d"][labels == c].max()
        out.append((lb / (lb + ld + 1e-8))[valid])
    return out


def test_lff_weights_match_a_numpy_port_of_the_lff_code():
    from jaxmed.methods.biaspruner import lff
    rng = np.random.default_rng(0)
    n, alpha = 12, 0.7
    labels = np.array([0, 1, 0, 1, 1, 0, 0, 1, -1, -1, 0, 1], np.int32)  # -1: other tasks
    batches = []
    for b in range(5):  # slots seen repeatedly, some never; the last row padding
        index = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 10, 11], 4, replace=False)
        valid = np.array([True, True, True, b % 2 == 0])
        y = labels[index]
        # biased model: low loss on class 0, high on class 1; debiased: the reverse
        loss_b = np.where(y == 0, 0.1, 2.0) * rng.uniform(0.5, 1.5, 4)
        loss_d = np.where(y == 0, 1.5, 0.3) * rng.uniform(0.5, 1.5, 4)
        batches.append((index, y, loss_b, loss_d, valid))
    want = _lff_reference(batches, labels, n, alpha)

    @jax.jit
    def step(mem_b, mem_d, seen, index, y, loss_b, loss_d, valid, labels):
        mem_b, seen_new = lff.ema_update(mem_b, seen, index, loss_b, valid, alpha)
        mem_d, _ = lff.ema_update(mem_d, seen, index, loss_d, valid, alpha)
        return mem_b, mem_d, seen_new, lff.relative_difficulty(mem_b, mem_d, labels, index, y, 2)

    mem_b = mem_d = seen = jnp.zeros(n)
    for (index, y, loss_b, loss_d, valid), w_ref in zip(batches, want):
        mem_b, mem_d, seen, w = step(mem_b, mem_d, seen, index, y, loss_b, loss_d, valid,
                                     labels)
        np.testing.assert_allclose(np.asarray(w)[valid], w_ref, rtol=1e-5)
    # By hand: two class-0 samples, first update (memory = loss), class maxima 2 and 2:
    # L_b / max = (0.5, 1), L_d / max = (1, 0.5) -> W = (1/3, 2/3); a third sample of class 1
    # alone in its class normalises to 1 / (1 + 1).
    two = np.array([0, 0, 1], np.int32)
    _, _, _, w = step(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), np.arange(3), two,
                      np.array([1.0, 2.0, 0.3]), np.array([2.0, 1.0, 5.0]), np.ones(3, bool),
                      two)
    np.testing.assert_allclose(w, [1 / 3, 2 / 3, 0.5], rtol=1e-5)


def test_shared_colours_paint_every_task_with_task_0s_pair():
    """`shared_colours`: the same images, except that task 1's glyphs take task 0's red / green
    by their `bias` attribute; task 0's images are untouched."""
    from jaxmed.data import synthetic_bias as sb

    kw = dict(num_tasks=2, per_task=40, size=16, bias_rate=0.9, noise=0.0, seed=3)
    own, y, bias, _ = sb.generate(**kw)
    shared, y2, bias2, _ = sb.generate(**kw, shared_colours=True)
    assert (y == y2).all() and (bias == bias2).all()
    np.testing.assert_array_equal(own[:40], shared[:40])
    for i in range(40, 80):
        glyph = np.any(own[i] != shared[i], axis=-1)
        assert glyph.sum() > 10
        mean = shared[i][glyph].mean(0)
        dist = np.linalg.norm(sb.COLOURS[0] - mean, axis=-1)  # to red, green
        assert np.argmin(dist) == bias[i] and dist.min() < 45, (i, mean)
        assert np.linalg.norm(own[i][glyph].mean(0) - sb.COLOURS[1, bias[i]]) < 45


def test_balanced_finetune_weights_give_both_gce_groups_the_same_total():
    """exp(alpha * GCE) per sample in the table slot of its record index; with the GCE split,
    the misclassified samples' weights are scaled to the aligned samples' total (JTT-style),
    keeping the ratios inside each group; an empty group leaves the weights as they are."""
    index = np.array([5, 0, 3, 7, 2])
    gce = np.array([0.1, 1.2, 0.0, 0.9, 0.3])
    aligned = np.array([True, False, True, False, True])
    ones = np.ones(9, np.float32)
    plain = subnetworks.finetune_weights(index, gce, 2.0, ones, 0)
    np.testing.assert_allclose(plain[index], np.exp(2.0 * gce), rtol=1e-6)
    assert plain[[1, 4, 6, 8]].tolist() == [1, 1, 1, 1]  # records of no sample keep weight 1
    w = subnetworks.finetune_weights(index, gce, 2.0, ones, 0, aligned)
    e = np.exp(2.0 * gce)
    total = e[aligned].sum()  # 1.2214 + 1 + 1.8221 = 4.04; conflicting e^2.4 + e^1.8 = 17.07
    np.testing.assert_allclose(w[index][aligned], e[aligned], rtol=1e-6)
    np.testing.assert_allclose(w[index][~aligned], e[~aligned] * total / e[~aligned].sum(),
                               rtol=1e-6)
    np.testing.assert_allclose(w[[0, 7]].sum(), w[[5, 3, 2]].sum(), rtol=1e-6)
    # alpha 0: JTT's upweighting, |aligned| / |conflicting| = 3 / 2 for each conflicting sample
    jtt = subnetworks.finetune_weights(index, gce, 0.0, ones, 0, aligned)
    np.testing.assert_allclose(jtt[index], [1, 1.5, 1, 1.5, 1], rtol=1e-6)
    for one_group in (np.ones(5, bool), np.zeros(5, bool)):
        same = subnetworks.finetune_weights(index, gce, 2.0, ones, 0, one_group)
        np.testing.assert_allclose(same, plain, rtol=1e-6)


def test_config_reaches_the_weighting_and_the_images(seq):
    """The synthetic configs' balance_groups reaches BiasPruner's setup (and its ablation's),
    shared_colours the generated images; vflip with a third task (triangles) is refused."""
    from jaxmed.data import synthetic_bias as sb

    assert seq.config.continual.balance_groups
    assert subnetworks.init(seq, "bias")[0].balance_groups
    assert subnetworks.init(seq, "magnitude")[0].balance_groups
    data = seq.config.data
    shared = sb.build(data).splits["test"]
    own = copy.deepcopy(data)
    own.synthetic_bias.shared_colours = False
    other = sb.build(own).splits["test"]
    task0 = np.asarray(shared.labels) < 2
    np.testing.assert_array_equal(shared.images[task0], other.images[task0])
    assert (shared.images[~task0] != other.images[~task0]).any()
    three = copy.deepcopy(data)
    three.synthetic_bias.num_tasks = 3
    with pytest.raises(ValueError, match="config.data.train_augment=.*vflip"):
        sb.build(three)


@pytest.mark.parametrize("key, value, match", [
    ("continual.methods", ("biaspruner", "packnett"), r"unknown \['packnett'\]"),
    ("continual.seeds", (0, 0), "repeats a seed"),
    ("train.schedule", "cosine", "config.train.schedule='cosine'"),
])
def test_bad_continual_config_is_named(key, value, match):
    from jaxmed.methods import biaspruner

    c = biaspruner.default_config()
    group, name = key.split(".")
    c[group][name] = value
    with pytest.raises(ValueError, match=match):
        biaspruner.check_config(c)
