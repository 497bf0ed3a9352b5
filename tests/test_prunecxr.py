"""PruneCXR: every analysis quantity against an independent numpy / scipy / scikit-learn
computation on constructed predictions; the sweep compiles once; the study runs end to end."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn import metrics as skm

from jaxmed.methods import prunecxr_analysis as A

RNG = np.random.default_rng(0)
R, S, N, C = 3, 4, 120, 5
LABELS = (RNG.random((N, C)) < np.array([0.5, 0.3, 0.2, 0.1, 0.05])).astype(np.float32)
LABELS[:5] = 1  # every class present
PREDS = np.clip(LABELS[None, None] * 0.3 + RNG.random((R, S, N, C)) * (1 - 0.2 *
                np.arange(S))[None, :, None, None], 0, 1).astype(np.float32)
SPARSITIES = [0.0, 0.3, 0.6, 0.9]


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


# ------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from configs import prunecxr_quick
    from jaxmed.methods import prunecxr
    from jaxmed.pruning import sweep

    workdir = str(tmp_path_factory.mktemp("prunecxr"))
    cfg = prunecxr_quick.get_config("tiny")
    builds = sweep.build_masked_params._cache_size()
    result = prunecxr.train_and_evaluate(cfg, workdir)
    return {"workdir": workdir, "config": cfg, "result": result,
            "new_mask_programs": sweep.build_masked_params._cache_size() - builds}


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


def test_sweep_compiles_once_and_level_zero_is_the_dense_model(quick_run):
    from jaxmed.methods import supervised
    assert quick_run["new_mask_programs"] == 1  # 2 runs x 2 types x 2 chunks: one program
    cfg = quick_run["config"]
    run = os.path.join(quick_run["workdir"], "runs", "run_00")
    s = supervised.setup(cfg, run)
    from jaxmed.methods.prunecxr import load_model_variables
    v = load_model_variables(run, s["model"], cfg.model.name, (16, 16, 3))
    state = s["state"].replace(params=jax.device_put(v["params"]),
                               batch_stats=jax.device_put(v["batch_stats"]))
    dense = s["evaluator"].predict(state, "test")["probs"]
    swept = np.load(os.path.join(quick_run["workdir"], "sweep", "run_00_l1.npy"))
    np.testing.assert_allclose(swept[0], dense, atol=1e-5)
    assert np.abs(swept[-1] - dense).max() > 1e-3  # 95% sparsity changes the predictions


def test_rerun_skips_finished_stages(quick_run):
    from jaxmed.methods import prunecxr
    w = quick_run["workdir"]
    stamp = {f: os.path.getmtime(os.path.join(w, f)) for f in
             ("runs/run_00/final.json", "sweep/run_01_random.npy")}
    cfg = quick_run["config"]
    cfg.unlock()
    cfg.stages = "train,sweep"
    prunecxr.train_and_evaluate(cfg, w)
    cfg.stages = "train,sweep,analyze"
    cfg.lock()
    for f, t in stamp.items():
        assert os.path.getmtime(os.path.join(w, f)) == t, f
    meta = json.load(open(os.path.join(w, "sweep", "sweep.json")))
    assert meta["prune_types"] == ["l1", "random"] and len(meta["sparsities"]) == 20


def test_torch_resnet50_checkpoint_loads_for_the_sweep(tmp_path):
    torch = pytest.importorskip("torch")
    from jaxmed.methods.prunecxr import load_model_variables
    from jaxmed.models import create_model
    from tests import torch_reference as ref
    net = ref.ResNet(ref.Bottleneck, (3, 4, 6, 3), 20)
    torch.save(net.state_dict(), tmp_path / "run0.pt")
    v = load_model_variables(str(tmp_path / "run0.pt"), create_model("resnet50", 20), "resnet50",
                             (32, 32, 3))
    np.testing.assert_allclose(v["params"]["fc"]["kernel"], net.fc.weight.detach().numpy().T)
