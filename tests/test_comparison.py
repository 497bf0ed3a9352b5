"""Comparison runs: finished runs are not rerun, means and sample standard deviations per
method, verdicts only beyond the seed spread, bad method / seed tuples named."""

import csv
import os

import numpy as np
import pytest

from jaxmed.train import comparison


def test_run_all_skips_finished_runs_and_summarizes(tmp_path):
    calls = []

    def run_one(method, seed, d):
        calls.append((method, seed))
        assert d == comparison.run_dir(str(tmp_path), method, seed)
        return {"test/auc": {"a": 0.7, "b": 0.6}[method] + 0.01 * seed, "test/acc": seed}

    res = comparison.run_all(str(tmp_path), ("a", "b"), (0, 1, 3), run_one)
    assert len(calls) == 6
    again = comparison.run_all(str(tmp_path), ("a", "b"), (0, 1, 3), run_one)
    assert len(calls) == 6 and again == res  # read back from result.json
    summary = comparison.write_comparison(str(tmp_path / "report" / "comparison.csv"), res,
                                          ["test/auc", "test/acc"])
    want = np.array([0.70, 0.71, 0.73])
    assert summary["a"]["test/auc"] == pytest.approx(want.mean())
    assert summary["a"]["test/auc_std"] == pytest.approx(want.std(ddof=1))
    rows = list(csv.DictReader(open(tmp_path / "report" / "comparison.csv")))
    assert [r["method"] for r in rows] == ["a", "b"]
    assert set(rows[0]) == {"method", "seeds", "test/auc", "test/auc_std", "test/acc",
                            "test/acc_std"}
    assert float(rows[1]["test/auc"]) == pytest.approx(0.6 + 0.04 / 3)
    # a beats b by 0.1, far more than either spread (~0.015); the reverse is no verdict
    assert comparison.beats(summary, "a", "b", "test/auc")
    assert not comparison.beats(summary, "b", "a", "test/auc")
    comparison.metric_by_method_figure(str(tmp_path / "auc.png"), res, "test/auc")
    assert os.path.getsize(tmp_path / "auc.png") > 1000


def test_no_verdict_from_one_seed_or_within_spread():
    one = {"a": {"seeds": 1, "m": 0.9, "m_std": 0.0}, "b": {"seeds": 1, "m": 0.1, "m_std": 0.0}}
    assert not comparison.beats(one, "a", "b", "m")
    close = {"a": {"seeds": 3, "m": 0.80, "m_std": 0.05},
             "b": {"seeds": 3, "m": 0.76, "m_std": 0.01}}
    assert not comparison.beats(close, "a", "b", "m")
    assert comparison.beats(close, "b", "a", "m", higher=False) is False
    low = {"a": {"seeds": 3, "m": 0.1, "m_std": 0.01}, "b": {"seeds": 3, "m": 0.3, "m_std": 0.02}}
    assert comparison.beats(low, "a", "b", "m", higher=False)


@pytest.mark.parametrize("methods, seeds, match", [
    ("a,b", (0,), "methods='a,b' must be a non-empty tuple"),
    (("a", "c"), (0,), r"unknown \['c'\]"),
    (("a", "a"), (0,), "repeats a method"),
    (("a",), 0, "seeds=0 must be a non-empty tuple of ints"),
    (("a",), (0, 0), "repeats a seed"),
])
def test_bad_methods_and_seeds_are_named(methods, seeds, match):
    with pytest.raises(ValueError, match=match):
        comparison.check_methods_and_seeds(methods, seeds, ("a", "b"), "ssl")
