"""BiasPruner: bias scores vs numpy, earlier tasks bitwise frozen, entropy selection, fairness
and continual metrics vs hand-computed values, 8-device inference equal to 1-device, the whole
comparison end to end."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import metrics
from jaxmed.methods import biaspruner
from jaxmed.methods.biaspruner import baselines, continual, subnetworks
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
    logits = jnp.where(cmask[None], logits, continual.NEG)
    valid = jnp.array([True, True, True])
    np.testing.assert_array_equal(continual.select_task(logits, cmask, valid)[:3], [1, 0, 2])
    only_two = jnp.array([True, True, False])
    assert int(continual.select_task(logits, cmask, only_two)[3]) in (0, 1)
    # Normalisation by log(C_t): a uniform 3-class and a uniform 2-class prediction tie at 1.
    ent = continual.normalized_entropy(jnp.where(cmask[None], 0.0, continual.NEG)[:1], cmask)
    np.testing.assert_allclose(ent[0], [1.0, 1.0, 1.0], rtol=1e-6)


# ------------------------------------------------------------------------- the learner
@pytest.fixture(scope="module")
def env():
    cfg = _config("quick", "tiny")
    tasks, info = continual.build_tasks(cfg)
    return continual.Env(cfg, tasks, info)


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


def test_bias_scores_equal_numpy(env):
    from jaxmed.data import augment
    setup, state = subnetworks.init(env, "bias")
    rng = np.random.default_rng(0)
    params = {"backbone": jax.tree.map(lambda v: v + 0.05 * rng.normal(size=v.shape).astype(
        v.dtype), state.backbone), "heads": state.heads}
    stats = jax.tree.map(lambda x: x[0], state.task_stats)
    cmask = continual.class_mask(env.tasks, env.num_tasks, env.max_classes)
    source = env.tasks[0].splits["train"]
    scores = subnetworks.score_pass(env, setup, params, stats, 0, cmask, source)["scores"]

    acts, correct = {}, []
    for b in env.batches(source):
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


@pytest.mark.parametrize("selection", ["bias", "packnet"])
def test_earlier_tasks_are_bitwise_frozen(env, tmp_path, selection):
    from jaxmed.pruning.masks import apply_masks
    setup, state = subnetworks.init(env, selection)
    programs = subnetworks.train_step._cache_size()
    state = subnetworks.train_task(env, setup, state, 0, str(tmp_path / "t0"))
    before = jax.tree.map(np.copy, subnetworks.subset(state.backbone,
                                                       subnetworks.is_shared_kernel))
    owner0 = jax.tree.map(lambda o: o == 0, state.owner)
    bn0, stats0 = jax.tree.map(lambda x: np.copy(x[0]), (state.task_bn, state.task_stats))
    head0 = np.asarray(state.heads["kernel"][0]).copy()
    images = next(iter(env.batches(env.tasks[0].splits["test"])))["image"]
    packnet = selection == "packnet"

    def logits(s, axis="map"):
        return np.asarray(subnetworks.all_logits(env.replicate(s), images, model=setup.model,
                                                 task_axis=axis, packnet=packnet))

    logits0 = logits(state)[:, 0]
    assert sum(int(np.sum(o)) for o in jax.tree.leaves(owner0)) > 0

    state = subnetworks.train_task(env, setup, state, 1, str(tmp_path / "t1"))
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
        cmask = continual.class_mask(env.tasks, env.num_tasks, env.max_classes)
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
def test_shared_baselines_compile_each_step_once(env, tmp_path, kind):
    setup, state = baselines.init(env, kind)
    programs = baselines.train_step._cache_size()
    for t in range(env.num_tasks):
        state = baselines.train_task(env, setup, state, t, str(tmp_path / f"t{t}"))
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
    cfg.continual.methods = ("biaspruner", "packnet", "finetune", "joint", "ewc", "lwf")
    result = biaspruner.train_and_evaluate(cfg, str(tmp_path))
    for m in ("biaspruner", "packnet", "finetune", "joint", "ewc", "lwf"):
        assert 0 <= result[f"{m}/acc"] <= 1 and f"{m}/eodd" in result
    d = tmp_path / "report"
    for name in ("report.md", "comparison.csv", "fairness.csv", "subnetworks.csv",
                 "accuracy_matrices.png", "acc_vs_eodd.png"):
        assert (d / name).stat().st_size > 0, name
    assert "- vs finetune: final ACC" in (d / "report.md").read_text()
    res = json.load(open(tmp_path / "biaspruner" / "results.json"))
    assert np.isnan(res["agnostic"][0][1])  # task 1 not evaluated before it is learned
    # A re-run resumes every finished task instead of retraining it.
    saved = tmp_path / "biaspruner" / "tasks" / "2"  # orbax: the state after task 1
    stamp = os.path.getmtime(saved)
    again = biaspruner.train_and_evaluate(cfg, str(tmp_path))
    assert os.path.getmtime(saved) == stamp
    assert again["biaspruner/acc"] == pytest.approx(result["biaspruner/acc"])


def test_unknown_sensitive_attribute_fails_naming_the_key(tmp_path):
    cfg = _config("quick", "tiny")
    cfg.continual.sensitive_attr = "skin_type"
    with pytest.raises(ValueError, match=r"sensitive_attr='skin_type'.*\['bias'\]"):
        biaspruner.train_and_evaluate(cfg, str(tmp_path))


def test_report_verdicts_weigh_sampling_noise():
    """A 0.01 lead on 200 test images is noise; a 0.2 lead is not; chance-level selection is
    called out."""
    from jaxmed.methods.biaspruner import report as continual_report

    def res(acc, aware, eodd, sel):
        return {"summary": {"acc": acc, "aware_acc": aware, "eodd": eodd,
                            "task_selection": sel}, "agnostic": np.zeros((2, 2))}

    lines = continual_report._verdicts({"biaspruner": res(0.60, 0.80, 0.2, 0.5),
                                        "finetune": res(0.59, 0.60, 1.5, 0.5)}, 200)
    acc_part, aware_part, eodd_part = lines[0].split("; ")
    assert "higher (within 2 standard errors" in acc_part
    assert aware_part.endswith("higher") and eodd_part.endswith("smaller")
    assert "near chance (0.50; chance 0.50)" in lines[1]
    bp = res(0.6, 0.6, 0.2, 0.5)
    bp["masks"] = {"aligned": [570, 563], "conflicting": [30, 37]}
    lines = continual_report._verdicts({"biaspruner": bp}, 200)
    assert "570 / 30, 563 / 37 bias-aligned / bias-conflicting" in lines[0]
    lines = continual_report._verdicts({"biaspruner": res(0.5, 0.5, 2.0, 0.9),
                                        "packnet": res(0.7, 0.7, 0.1, 0.9)}, 200)
    assert len(lines) == 1 and "NOT higher;" in lines[0] and "NOT smaller" in lines[0]


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
    tasks, info = continual.build_tasks(cfg)
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
    for k in z.files:
        if k.startswith("all_aware_") or k.startswith("all_acc_"):
            np.testing.assert_array_equal(z[k], z["one_" + k[4:]])
    assert int(z["compiles"]) == 2 and int(z["logit_compiles"]) == 2
