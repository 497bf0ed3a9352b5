"""PruneCXR: every analysis quantity against an independent numpy / scipy / scikit-learn
computation on constructed predictions; bad config values fail up front naming the key; the
sweep compiles once, shards its batches over 8 devices with the 1-device results; the study
runs end to end."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn import metrics as skm

from jaxmed.methods.prunecxr import analysis as A
from tests.conftest import REPO, run_python

RNG = np.random.default_rng(0)
R, S, N, C = 3, 4, 120, 5
LABELS = (RNG.random((N, C)) < np.array([0.5, 0.3, 0.2, 0.1, 0.05])).astype(np.float32)
LABELS[:5] = 1  # every class present
PREDS = np.clip(LABELS[None, None] * 0.3 + RNG.random((R, S, N, C)) * (1 - 0.2 *
                np.arange(S))[None, :, None, None], 0, 1).astype(np.float32)
SPARSITIES = [0.0, 0.3, 0.6, 0.9]


def quick_config(arg=""):
    """configs/prunecxr/quick.py loaded by path, as `jaxmed --config=` loads it."""
    spec = importlib.util.spec_from_file_location(
        "quick", os.path.join(REPO, "configs", "prunecxr", "quick.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_per_class_metrics_match_sklearn():
    m = A.per_class_metrics(PREDS, LABELS)
    for r in range(R):
        for s in range(S):
            np.testing.assert_allclose(m["ap"][r, s], skm.average_precision_score(
                LABELS, PREDS[r, s], average=None))
            np.testing.assert_allclose(m["auc"][r, s], skm.roc_auc_score(
                LABELS, PREDS[r, s], average=None))
            np.testing.assert_allclose(m["f1"][r, s], skm.f1_score(
                LABELS, PREDS[r, s] >= 0.5, average=None, zero_division=0))


def test_forgettability_is_median_of_paired_relative_change():
    ap = A.per_class_metrics(PREDS, LABELS)["ap"]
    want = np.zeros((S, C))
    for s in range(S):
        for c in range(C):
            want[s, c] = np.median([(ap[r, s, c] - ap[r, 0, c]) / ap[r, 0, c] for r in range(R)])
    np.testing.assert_allclose(A.forgettability_curves(ap), want)


def test_first_drop_is_strict_and_none_when_never():
    curves = np.array([[0.0, 0.0, 0.0],
                       [-0.1, -0.2, -0.05],
                       [-0.25, -0.2, -0.1],
                       [-0.5, -0.21, -0.19]])
    assert A.first_drop(curves, SPARSITIES, 0.2) == [0.6, 0.9, None]
    np.testing.assert_array_equal(A.change_at(curves, SPARSITIES, 0.9), curves[3])
    with pytest.raises(ValueError, match="0.95"):
        A.change_at(curves, SPARSITIES, 0.95)


def test_correlations_match_scipy():
    x = RNG.normal(size=19)
    y = 0.6 * x + RNG.normal(size=19)
    c = A.correlate(x, y)
    r, p = stats.pearsonr(x, y)
    rho, prho = stats.spearmanr(x, y)
    assert (c.pearson_r, c.pearson_p) == pytest.approx((r, p), rel=1e-9)
    assert (c.spearman_rho, c.spearman_p) == pytest.approx((rho, prho), rel=1e-9)
    with_none = A.correlate(list(x) + [1.0], list(y) + [None])  # a class that never drops
    assert with_none.n == 19 and with_none.pearson_r == pytest.approx(r)


def test_class_pairs_and_iou_match_loops():
    curves = RNG.normal(size=(S, C))
    log_freq = np.log(np.array([500, 200, 50, 10, 3.0]))
    pairs = A.class_pairs(curves, log_freq, LABELS)
    assert len(pairs["fcd"]) == C * (C - 1) // 2
    for k, (i, j) in enumerate(zip(pairs["i"], pairs["j"])):
        assert pairs["fcd"][k] == pytest.approx(np.sqrt(np.sum((curves[1:, i] -
                                                                curves[1:, j]) ** 2)))
        both = np.sum((LABELS[:, i] > 0) & (LABELS[:, j] > 0))
        either = np.sum((LABELS[:, i] > 0) | (LABELS[:, j] > 0))
        assert pairs["iou_quarter"][k] == pytest.approx((both / either) ** 0.25)
        assert pairs["dlogfreq"][k] == pytest.approx(abs(log_freq[i] - log_freq[j]))


def test_pies_known_by_construction():
    """Images whose class ranking the 90% ensemble reverses are the PIEs; the rest keep it."""
    n, c = 100, 6
    base = RNG.random((n, c))
    preds = np.stack([base, base * 0.9, base * 0.7, base * 0.5])[None].repeat(3, 0)
    planted = np.array([3, 17, 42, 77, 91])
    preds[:, 3, planted] = 1 - base[planted]  # the 0.9 level reverses these images' ranking
    preds[1, 3, 50] = preds[1, 3, 50, ::-1]  # one run disagreeing is not enough
    pies, scores = A.find_pies(preds, SPARSITIES, level=0.9, fraction=0.05)
    assert sorted(pies) == sorted(planted)
    ens = preds.mean(0)
    for i in range(0, n, 7):
        assert scores[i] == pytest.approx(stats.spearmanr(ens[0, i], ens[3, i])[0])


def test_pie_ratio_and_disease_counts():
    pies = np.array([0, 1, 2, 10])
    ratio = A.prevalence_ratio(LABELS, pies)
    mask = np.zeros(N, bool)
    mask[pies] = True
    np.testing.assert_allclose(ratio, LABELS[mask].mean(0) / LABELS[~mask].mean(0))
    names = ["No Finding", "a", "b", "c", "d"]
    shares = A.disease_count_shares(LABELS, pies, names)
    k = np.minimum(LABELS[:, 1:].sum(1), 4).astype(int)
    np.testing.assert_allclose(shares["pie"], [np.mean(k[mask] == v) for v in range(5)])
    np.testing.assert_allclose(shares["non_pie"], [np.mean(k[~mask] == v) for v in range(5)])


# ------------------------------------------------------------------------ config checks
@pytest.mark.parametrize("key, value, match", [
    ("prunecxr.prune_types", ("l1, random",), r"prunecxr\.prune_types.*'l1, random'.*tuple"),
    ("prunecxr.prune_types", ("l1", "magnitude"), r"prunecxr\.prune_types.*'magnitude'"),
    ("prunecxr.prune_types", (), r"prunecxr\.prune_types"),
    ("stages", ("train", "sweeps"), r"config\.stages.*'sweeps'"),
    ("stages", "train,sweep", r"config\.stages.*must be a tuple"),
    ("prunecxr.sparsities", (0.1, 0.5, 0.9, 0.95), r"prunecxr\.sparsities.*start at 0\.0"),
    ("prunecxr.sparsities", (0.0, 0.5, 0.3, 0.9, 0.95), r"prunecxr\.sparsities.*increase"),
    ("prunecxr.sparsities", (0.0, 0.3, 0.9), r"prunecxr\.change_level=0\.95"),
    ("prunecxr.level_axis", "pmap", r"prunecxr\.level_axis"),
])
def test_bad_config_values_fail_up_front_naming_the_key(tmp_path, key, value, match):
    from jaxmed.methods import prunecxr
    cfg = quick_config("tiny")
    cfg.unlock()
    group, _, name = key.rpartition(".")
    target = cfg[group] if group else cfg
    del target[name]  # the field's type is fixed once set: replace it
    target[name] = value
    with pytest.raises(ValueError, match=match):
        prunecxr.train_and_evaluate(cfg, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")  # nothing written, nothing trained


def test_comma_string_on_the_command_line_is_refused(tmp_path):
    """`--config.prunecxr.prune_types="l1, random"` becomes a 1-tuple ('l1, random',), which
    the old sweep turned into files named `run_00_ random.npy`: now an error naming the key."""
    proc = run_python(["-m", "jaxmed.main", "--config=configs/prunecxr/quick.py:tiny",
                       f"--workdir={tmp_path}/w", "--config.prunecxr.prune_types=l1, random"],
                      check=False, timeout=120)
    assert proc.returncode != 0
    assert "config.prunecxr.prune_types" in proc.stderr and "'l1, random'" in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "runs")


# ------------------------------------------------------------------------ sharded sweep
def test_sweep_on_eight_devices_matches_one_device(tmp_path):
    """The sweep stage feeds its jitted forward image batches sharded over all 8 devices and
    replicated stacked params, fetches once per chunk of levels (plus once for the labels),
    drops the padded rows, writes the 1-device predictions; level 0 is the dense model."""
    out = tmp_path / "sweep.npz"
    run_python(["tests/scripts/prunecxr_sharded_sweep.py", str(out), str(tmp_path / "w")],
               devices=8)
    r = np.load(out)
    assert r["devices"] == 8
    # 64 images in global batches of 24 (the last padded) x 2 chunks of levels
    assert r["shard_devices"].tolist() == [8] * 6
    assert r["shard_rows"].tolist() == [[3] * 8] * 6 and r["batch_rows"].tolist() == [24] * 6
    assert r["params_replicated"]
    assert r["fetches_stage"] == 1 + 2  # the labels pass, then one fetch per chunk
    assert r["preds_stage"].shape == (4, 64, 5) and r["preds_stage"].dtype == np.float32
    np.testing.assert_array_equal(r["index_stage"], np.arange(64))
    np.testing.assert_array_equal(r["label_stage"], r["labels"])
    np.testing.assert_allclose(r["preds_stage"], r["preds_1"], atol=1e-6)
    np.testing.assert_allclose(r["preds_stage"][0], r["dense"], atol=1e-5)
    assert np.abs(r["preds_stage"][3] - r["dense"]).max() > 1e-3  # 90% sparsity changes them


# ------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from jaxmed.methods import prunecxr
    from jaxmed.pruning.sweep import build_masked_params

    workdir = str(tmp_path_factory.mktemp("prunecxr"))
    cfg = quick_config("tiny")
    builds = build_masked_params._cache_size()
    result = prunecxr.train_and_evaluate(cfg, workdir)
    return {"workdir": workdir, "config": cfg, "result": result,
            "new_mask_programs": build_masked_params._cache_size() - builds}


def test_study_writes_the_full_report(quick_run):
    d = os.path.join(quick_run["workdir"], "report")
    for name in ("summary.md", "per_class.csv", "metrics_by_sparsity.csv", "forgettability.csv",
                 "correlations.csv", "class_pairs.csv", "pies.csv", "pie_prevalence_ratio.csv",
                 "pie_disease_counts.csv"):
        assert os.path.getsize(os.path.join(d, name)) > 0, name
    for name in ("map_vs_sparsity.png", "forgettability_l1.png", "forgettability_random.png",
                 "correlations_l1.png", "pie_prevalence_ratio.png", "pie_disease_counts.png",
                 "pie_grid.png"):
        with Image.open(os.path.join(d, name)) as im:
            assert im.size[0] > 300 and im.size[1] > 200, name
    summary = open(os.path.join(d, "summary.md")).read()
    assert "log train freq vs relative AP change at 95%" in summary and "PIEs" in summary
    sweeps = np.load(os.path.join(quick_run["workdir"], "sweep", "run_00_l1.npy"))
    assert sweeps.shape == (20, 64, 5)
    with open(os.path.join(quick_run["workdir"], "runs", "run_01", "config.json")) as f:
        run_cfg = json.load(f)  # each run is a plain supervised run with its own seed
    assert run_cfg["method"] == "supervised" and run_cfg["seed"] == 1
    assert "prunecxr" not in run_cfg and "stages" not in run_cfg


def test_sweep_compiles_once_and_level_zero_is_the_dense_model(quick_run):
    from jaxmed.methods import supervised
    from jaxmed.methods.prunecxr.stages import load_model_variables
    from jaxmed.train import sharding
    assert quick_run["new_mask_programs"] == 1  # 2 runs x 2 types x 2 chunks: one program
    cfg = quick_run["config"]
    run = os.path.join(quick_run["workdir"], "runs", "run_00")
    s = supervised.build_run(cfg)
    v = load_model_variables(run, s.model, cfg.model.name, (16, 16, 3))
    state = s.state.replace(params=sharding.replicate(v["params"], s.mesh),
                            batch_stats=sharding.replicate(v["batch_stats"], s.mesh))
    dense = s.evaluator.predict(state, "test")["probs"]
    swept = np.load(os.path.join(quick_run["workdir"], "sweep", "run_00_l1.npy"))
    np.testing.assert_allclose(swept[0], dense, atol=1e-5)
    assert np.abs(swept[-1] - dense).max() > 1e-3  # 95% sparsity changes the predictions


def test_resumed_study_refuses_another_sweep(quick_run):
    """Only keys that choose what runs (stages, chunking, report levels) may change on resume;
    other sparsities would mix two sweeps in one workdir."""
    from jaxmed.methods import prunecxr
    from jaxmed.train.workdir import ConfigChangedError
    cfg = quick_config("tiny")
    cfg.unlock()
    cfg.prunecxr.sparsities = (0.0, 0.5, 0.9, 0.95)
    with pytest.raises(ConfigChangedError, match=r"prunecxr\.sparsities"):
        prunecxr.train_and_evaluate(cfg, quick_run["workdir"])


def test_rerun_skips_finished_stages(quick_run):
    from jaxmed.methods import prunecxr
    w = quick_run["workdir"]
    stamp = {f: os.path.getmtime(os.path.join(w, f)) for f in
             ("runs/run_00/result.json", "sweep/run_01_random.npy")}
    cfg = quick_run["config"]
    cfg.unlock()
    cfg.stages = ("train", "sweep")
    prunecxr.train_and_evaluate(cfg, w)
    cfg.stages = ("train", "sweep", "analyze")
    cfg.lock()
    for f, t in stamp.items():
        assert os.path.getmtime(os.path.join(w, f)) == t, f
    meta = json.load(open(os.path.join(w, "sweep", "sweep.json")))
    assert meta["prune_types"] == ["l1", "random"] and len(meta["sparsities"]) == 20


def test_torch_resnet50_checkpoint_loads_for_the_sweep(tmp_path):
    torch = pytest.importorskip("torch")
    from jaxmed.methods.prunecxr.stages import load_model_variables
    from jaxmed.models import create_model
    from tests import torch_reference as ref
    net = ref.ResNet(ref.Bottleneck, (3, 4, 6, 3), 20)
    torch.save(net.state_dict(), tmp_path / "run0.pt")
    v = load_model_variables(str(tmp_path / "run0.pt"), create_model("resnet50", 20), "resnet50",
                             (32, 32, 3))
    np.testing.assert_allclose(v["params"]["fc"]["kernel"], net.fc.weight.detach().numpy().T)


def test_analyze_reads_forgettability_and_first_drop_from_ap_not_auc():
    """A constructed sweep whose AP and AUC disagree: a negative (two, for class 1) jumps above
    both positives among 18 negatives. AP falls by 5/12 (7/12) — past the 20% drop — while
    AUC falls by only 1/18 (1/9). Hand-computed: first 20% drop at 0.5 for class 0 and 0.9
    for class 1, relative AP change at 0.9 of -5/12 and -7/12. An analysis reading AUC would
    find no drop at all."""
    import ml_collections

    n, sp = 20, [0.0, 0.5, 0.9]
    labels = np.zeros((n, 2), np.float32)
    labels[[0, 1], 0] = 1
    labels[[2, 3], 1] = 1
    dense = np.tile(np.linspace(0.05, 0.5, n)[:, None], (1, 2))  # negatives, all distinct
    dense[[0, 1], 0], dense[[2, 3], 1] = (0.9, 0.8), (0.9, 0.8)
    levels = [dense.copy() for _ in sp]
    levels[1][10, 0] = 0.95                        # class 0: one negative on top at 0.5
    levels[2][10, 0] = 0.95
    levels[2][[10, 11], 1] = (0.97, 0.96)          # class 1: two negatives on top at 0.9
    preds = np.stack([np.stack(levels)] * 3).astype(np.float32)  # 3 identical runs
    sweeps = {"meta": {"sparsities": sp, "class_names": ["a", "b"], "prune_types": ["l1"],
                       "train_class_counts": [50, 5]},
              "labels": labels, "index": np.arange(n), "l1": preds}
    cfg = ml_collections.ConfigDict(dict(drop_threshold=0.2, change_level=0.9, pie_level=0.9,
                                         pie_fraction=0.1))
    res = A.analyze(sweeps, cfg)["kinds"]["l1"]
    np.testing.assert_allclose(res["curves"]["ap"][:, 0], [0, -5 / 12, -5 / 12], atol=1e-6)
    np.testing.assert_allclose(res["curves"]["ap"][:, 1], [0, 0, -7 / 12], atol=1e-6)
    np.testing.assert_allclose(res["curves"]["auc"][:, 0], [0, -1 / 18, -1 / 18], atol=1e-6)
    np.testing.assert_allclose(res["curves"]["auc"][:, 1], [0, 0, -1 / 9], atol=1e-6)
    assert res["first_drop"] == [0.5, 0.9]
    np.testing.assert_allclose(res["change"], [-5 / 12, -7 / 12], atol=1e-6)
