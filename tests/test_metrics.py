"""Every metric against scikit-learn on random data (with ties)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxmed import metrics as M


@pytest.fixture(params=[0, 1, 2])
def data(request):
    rng = np.random.default_rng(request.param)
    n, c = 300, 6
    probs = rng.dirichlet(np.ones(c), n).round(2)  # rounding makes ties
    probs /= probs.sum(1, keepdims=True)  # sklearn's multi-class AUC wants rows summing to 1
    labels = rng.integers(0, c, n)
    multi = (rng.random((n, c)) < 0.3).astype(np.float32)
    multi_scores = rng.random((n, c)).round(2)
    return probs, labels, multi, multi_scores


def test_single_label(data):
    probs, labels, _, _ = data
    pred = probs.argmax(1)
    c = probs.shape[1]
    got = M.single_label_metrics(probs, labels)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr",
                                                         average="macro"))
    assert got["f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert got["sensitivity"] == pytest.approx(skm.recall_score(labels, pred, average="macro"))
    np.testing.assert_array_equal(M.confusion_matrix(labels, pred, c),
                                  skm.confusion_matrix(labels, pred, labels=range(c)))
    onehot = M.one_hot(labels, c)
    np.testing.assert_allclose(M.per_class_ap(probs, onehot),
                               [skm.average_precision_score(onehot[:, k], probs[:, k])
                                for k in range(c)])
    cm = skm.confusion_matrix(labels, pred)
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
    spec = tn / (tn + cm.sum(0) - np.diag(cm))
    assert got["specificity"] == pytest.approx(spec.mean())


def test_multi_label(data):
    _, _, y, s = data
    got = M.multi_label_metrics(s, y)
    pred = (s >= 0.5).astype(int)
    np.testing.assert_allclose(M.per_class_auc(s, y), skm.roc_auc_score(y, s, average=None))
    np.testing.assert_allclose(M.per_class_ap(s, y),
                               skm.average_precision_score(y, s, average=None))
    assert got["map"] == pytest.approx(skm.average_precision_score(y, s, average="macro"))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, s, average="macro"))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert got["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert got["accuracy"] == pytest.approx(1 - skm.hamming_loss(y, pred))


def test_vectorised_over_leading_axes(data):
    _, _, y, s = data
    stacked = np.stack([s, s[::-1], np.sqrt(s)])
    got = M.per_class_ap(stacked, np.broadcast_to(y, stacked.shape))
    for i in range(3):
        np.testing.assert_allclose(got[i], skm.average_precision_score(y, stacked[i], average=None))


def test_undefined_auc_is_nan_and_skipped():
    y = np.array([[1, 0], [1, 1], [1, 0]], np.float32)  # class 0 has no negatives
    s = np.array([[0.2, 0.1], [0.3, 0.9], [0.1, 0.4]])
    assert np.isnan(M.per_class_auc(s, y)[0])
    assert M.macro_auc(s, y) == pytest.approx(skm.roc_auc_score(y[:, 1], s[:, 1]))


def test_rank_average_matches_scipy():
    from scipy.stats import rankdata
    x = np.random.default_rng(3).integers(0, 5, (4, 50)).astype(float)
    np.testing.assert_allclose(M.rank_average(x), rankdata(x, axis=-1))


@pytest.mark.parametrize("positive", [1, 0])
def test_fairness_against_fairlearn_on_asymmetric_groups(positive):
    """Groups with different base rates and different TPR and FPR gaps (and unknown-group
    rows, ignored): EOpp1 / EOpp0 / DP ratio / per-group accuracy equal fairlearn's; EOdd is the
    SUM of the TPR and FPR gaps, where fairlearn's equalized_odds_difference takes their MAX."""
    from fairlearn.metrics import (MetricFrame, demographic_parity_ratio,
                                   equalized_odds_difference, false_positive_rate,
                                   true_negative_rate, true_positive_rate)
    from sklearn.metrics import accuracy_score

    rng = np.random.default_rng(3)
    a = np.repeat([0, 1, -1], [300, 200, 40])
    y = (rng.random(a.size) < np.where(a == 0, 0.3, 0.6)).astype(int)
    flip = np.where(y == 1, np.where(a == 0, 0.15, 0.4), np.where(a == 0, 0.05, 0.3))
    p = np.where(rng.random(a.size) < flip, 1 - y, y)
    got = M.fairness(y, p, a, positive=positive)
    k = a >= 0
    yk, pk, ak = y[k], p[k], a[k]
    if positive == 0:  # fairlearn's demographic parity counts label 1 as the selection
        yk, pk = 1 - yk, 1 - pk
    frame = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate,
                                 "tnr": true_negative_rate, "acc": accuracy_score},
                        y_true=yk, y_pred=pk, sensitive_features=ak)
    gaps = frame.difference()
    assert gaps["tpr"] > 0.1 and gaps["fpr"] > 0.1 and abs(gaps["tpr"] - gaps["fpr"]) > 0.05
    assert got["eopp1"] == pytest.approx(gaps["tpr"])
    assert got["eopp0"] == pytest.approx(gaps["tnr"])
    assert got["eodd"] == pytest.approx(gaps["tpr"] + gaps["fpr"])
    fl_eodd = equalized_odds_difference(yk, pk, sensitive_features=ak)
    assert fl_eodd == pytest.approx(max(gaps["tpr"], gaps["fpr"])) and got["eodd"] > fl_eodd
    assert got["dp_ratio"] == pytest.approx(demographic_parity_ratio(yk, pk,
                                                                     sensitive_features=ak))
    for g in (0, 1):
        assert got[f"accuracy_group{g}"] == pytest.approx(frame.by_group["acc"][g])
        assert got[f"balanced_accuracy_group{g}"] == pytest.approx(
            (frame.by_group["tpr"][g] + frame.by_group["tnr"][g]) / 2)
