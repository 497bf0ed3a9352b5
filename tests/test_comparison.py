"""The comparison engine: finished runs are not rerun, a grown comparison runs only its new
sub-runs, atomic result.json and report files, means and sample standard deviations per
method, the one verdict rule, bad method / seed tuples named."""

import csv
import json
import os

import numpy as np
import pytest

import ml_collections

from jaxmed.train import comparison, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(methods, seeds, lr=0.1):
    c = ml_collections.ConfigDict({"method": "x", "seed": 0, "train": {"lr": lr},
                                   "cmp": {"methods": methods, "seeds": seeds}})
    return c


def _run_one(calls):
    def run_one(method, seed, d, sub):
        calls.append((method, seed))
        assert sub.cmp.methods == (method,) and sub.cmp.seeds == (seed,) and sub.seed == seed
        return {"test/auc": {"a": 0.7, "b": 0.6, "c": 0.5}[method] + 0.01 * seed,
                "test/acc": seed, "details": {"matrix": [[1.0, 2.0]]}}
    return run_one


def test_run_all_skips_finished_runs_and_summarizes(tmp_path):
    calls = []
    w = str(tmp_path)
    res = comparison.run_all(w, _config(("a", "b"), (0, 1, 3)), "cmp", _run_one(calls))
    assert len(calls) == 6
    again = comparison.run_all(w, _config(("a", "b"), (0, 1, 3)), "cmp", _run_one(calls))
    assert len(calls) == 6 and again == res  # read back from result.json
    assert res["a"][0]["details"] == {"matrix": [[1.0, 2.0]]}  # non-metric values kept
    sub = json.load(open(os.path.join(comparison.run_dir(w, "b", 3), "config.json")))
    assert sub["cmp"] == {"methods": ["b"], "seeds": [3]} and sub["seed"] == 3
    summary = comparison.write_comparison(str(tmp_path / "report" / "comparison.csv"), res,
                                          ["test/auc", "test/acc"])
    want = np.array([0.70, 0.71, 0.73])
    assert summary["a"]["test/auc"] == pytest.approx(want.mean())
    assert summary["a"]["test/auc_std"] == pytest.approx(want.std(ddof=1))
    rows = list(csv.DictReader(open(tmp_path / "report" / "comparison.csv")))
    assert [r["method"] for r in rows] == ["a", "b"]
    assert list(rows[0]) == ["method", "seeds", "test/auc", "test/auc_std", "test/acc",
                             "test/acc_std"]
    assert float(rows[1]["test/auc"]) == pytest.approx(0.6 + 0.04 / 3)
    assert comparison.verdict(summary, "a", "b", "test/auc") == "better"
    assert comparison.verdict(summary, "b", "a", "test/auc") == "worse"
    comparison.metric_by_method_figure(str(tmp_path / "auc.png"), res, "test/auc")
    assert os.path.getsize(tmp_path / "auc.png") > 1000


def test_adding_a_method_or_seed_runs_only_the_new_sub_runs(tmp_path):
    """`methods` / `seeds` are harmless: the workdir check accepts a grown comparison, the engine
    runs only the new (method, seed) pairs, and a removed method drops out of the results; a
    changed hyper-parameter is still refused."""
    w, calls = str(tmp_path), []
    first = _config(("a", "b"), (0, 1))
    workdir.write_config(first, w)
    comparison.run_all(w, first, "cmp", _run_one(calls))
    assert len(calls) == 4
    grown = _config(("a", "c"), (0, 1, 2))
    harmless = comparison.harmless_keys("cmp")
    assert workdir.check_config(grown, w, harmless=harmless) == []
    calls.clear()
    res = comparison.run_all(w, grown, "cmp", _run_one(calls))
    assert sorted(calls) == [("a", 2), ("c", 0), ("c", 1), ("c", 2)]
    assert list(res) == ["a", "c"] and len(res["a"]) == 3
    with pytest.raises(workdir.ConfigChangedError, match="train.lr"):
        workdir.check_config(_config(("a",), (0,), lr=0.2), w, harmless=harmless)


def test_half_done_sub_run_refuses_a_changed_hyper_parameter(tmp_path):
    """A comparison with a sub-run that started (config.json, checkpoints on disk) and did not
    finish refuses a changed key that changes results, before anything moves."""
    w = str(tmp_path)
    first = _config(("a",), (0,))
    workdir.write_config(first, w)
    d = comparison.run_dir(w, "a", 0)
    os.makedirs(os.path.join(d, "checkpoints"))
    workdir.write_config(comparison.sub_config(first, "cmp", "a", 0), d)
    with pytest.raises(workdir.ConfigChangedError, match="train.lr"):
        workdir.write_config(_config(("a",), (0,), lr=0.5), w,
                             harmless=comparison.harmless_keys("cmp"))
    assert os.path.isdir(os.path.join(d, "checkpoints")) and not os.path.exists(d + ".old1")


def test_an_accepted_config_change_reruns_sub_runs_and_keeps_the_old_ones(tmp_path):
    """After --allow_config_change (the top-level history records it), a sub-run made under the
    old config, finished or not, is never resumed nor reported under the new one: it is moved
    aside whole, listed in report/superseded.csv, and run again."""
    w, calls = str(tmp_path), []
    old = _config(("a", "b"), (0,))
    workdir.write_config(old, w)
    comparison.run_all(w, old, "cmp", _run_one(calls))
    half = comparison.run_dir(w, "b", 0)
    os.remove(os.path.join(half, "result.json"))  # b never finished
    os.makedirs(os.path.join(half, "checkpoints", "3"))
    new = _config(("a", "b"), (0,), lr=0.5)
    workdir.write_config(new, w, allow_changed=True)  # what main does with the flag
    calls.clear()
    res = comparison.run_all(w, new, "cmp", _run_one(calls))
    assert sorted(calls) == [("a", 0), ("b", 0)]  # both again, under lr 0.5
    for m in ("a", "b"):
        d = comparison.run_dir(w, m, 0)
        assert json.load(open(os.path.join(d, "config.json")))["train"]["lr"] == 0.5
        assert json.load(open(d + ".old1/config.json"))["train"]["lr"] == 0.1
    assert os.path.isdir(half + ".old1/checkpoints/3")  # kept whole
    table = open(tmp_path / "report" / "superseded.csv").read()
    assert "runs/a/seed_0.old1" in table and "train.lr: 0.1 -> 0.5" in table
    assert len(res["a"]) == 1
    calls.clear()
    comparison.run_all(w, new, "cmp", _run_one(calls))
    assert calls == []  # now current: nothing moves, nothing reruns


def test_a_failed_start_leaves_a_comparison_fresh(tmp_path):
    """A comparison whose first sub-run failed before writing anything (a bad key value) is a
    fresh workdir: the corrected config is not refused as a change."""
    w = str(tmp_path)
    bad = _config(("a",), (0,), lr=-1.0)
    workdir.write_config(bad, w)

    def failing(method, seed, d, sub):
        raise ValueError("config.train.lr=-1.0 must be > 0")

    with pytest.raises(ValueError, match="lr=-1.0"):
        comparison.run_all(w, bad, "cmp", failing)
    assert os.path.exists(os.path.join(comparison.run_dir(w, "a", 0), "config.json"))
    good = _config(("a",), (0,), lr=0.1)
    assert workdir.check_config(good, w) == []
    workdir.write_config(good, w)
    comparison.run_all(w, good, "cmp", _run_one([]))  # the sub-run's config is fresh too


def test_result_json_is_atomic_and_a_corrupt_one_is_named(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    comparison.write_result(d, {"test/auc": 0.5})
    real_dump = json.dump

    def dying_dump(obj, f, **kw):  # a kill halfway through the write
        f.write('{"test/auc": 0.')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dying_dump)
    with pytest.raises(KeyboardInterrupt):
        comparison.write_result(d, {"test/auc": 0.9})
    monkeypatch.setattr(json, "dump", real_dump)
    assert comparison.read_result(d) == {"test/auc": 0.5}  # the old one, whole
    with open(os.path.join(d, "result.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"run/result.json is unreadable.*delete it"):
        comparison.read_result(d)


def test_a_kill_while_writing_the_report_leaves_the_previous_table(tmp_path, monkeypatch):
    path = str(tmp_path / "report" / "comparison.csv")
    res = {"a": [{"test/auc": 0.7}, {"test/auc": 0.8}]}
    comparison.write_comparison(path, res, ["test/auc"])
    before = open(path).read()
    import csv as csv_mod

    class DyingWriter:
        def __init__(self, f):
            self.f = f

        def writerow(self, row):
            self.f.write(",".join(map(str, row)) + "\n")

        def writerows(self, rows):
            raise KeyboardInterrupt

    monkeypatch.setattr(csv_mod, "writer", DyingWriter)
    with pytest.raises(KeyboardInterrupt):
        comparison.write_comparison(path, {"b": [{"test/auc": 0.1}]}, ["test/auc"])
    assert open(path).read() == before


def test_one_verdict_rule_two_standard_errors_and_three_seeds():
    def row(mean, sd, n):
        return {"seeds": n, "m": mean, "m_std": sd, "m_n": n}

    # gap 0.04; 2 SE = 2 sqrt(0.05^2 / 3 + 0.01^2 / 3) = 0.0589: within noise
    close = {"a": row(0.80, 0.05, 3), "b": row(0.76, 0.01, 3)}
    assert comparison.verdict(close, "a", "b", "m") == "within noise"
    # the same gap with sds 0.01 each: 2 SE = 0.0163 < 0.04 -> better, though the old
    # "larger sd" rule and this one agree here, the next case tells them apart
    tight = {"a": row(0.80, 0.01, 3), "b": row(0.76, 0.01, 3)}
    assert comparison.verdict(tight, "a", "b", "m") == "better"
    # gap 0.03 with sd 0.04 over 10 seeds: 2 SE = 0.0358 -> noise; over 20 seeds: 0.0253 -> better
    assert comparison.verdict({"a": row(0.83, 0.04, 10), "b": row(0.80, 0.04, 10)},
                              "a", "b", "m") == "within noise"
    assert comparison.verdict({"a": row(0.83, 0.04, 20), "b": row(0.80, 0.04, 20)},
                              "a", "b", "m") == "better"
    # lower is better
    low = {"a": row(0.1, 0.01, 3), "b": row(0.3, 0.02, 3)}
    assert comparison.verdict(low, "a", "b", "m", higher=False) == "better"
    assert comparison.verdict(low, "a", "b", "m") == "worse"
    # two seeds, or three runs of which one is NaN: no verdict however large the gap
    assert comparison.verdict({"a": row(0.9, 0.0, 2), "b": row(0.1, 0.0, 2)},
                              "a", "b", "m") == "too few seeds"
    s = comparison.summarize({"a": [{"m": 0.9}, {"m": 0.91}, {"m": float("nan")}],
                              "b": [{"m": 0.1}, {"m": 0.11}, {"m": 0.12}]}, ["m"])
    assert s["a"]["runs"] == 3 and s["a"]["seeds"] == s["a"]["m_n"] == 2
    assert comparison.verdict(s, "a", "b", "m") == "too few seeds"
    assert "too few seeds" in comparison.verdict_line(s, "a", "b", "m")


# (method package, comparison section, the method run first, the method added): tiny real runs
GROWN = [("tear", "ssl", "supervised", "pseudo_label"),
         ("fopro_kd", "kd", "ce", "balanced_softmax"),
         ("htl", "htl", "baseline", "htl_weight"),
         ("biaspruner", "continual", "finetune", "joint")]


@pytest.mark.slow
@pytest.mark.parametrize("package, section, first, added", GROWN)
def test_every_method_grows_a_finished_comparison_by_its_new_sub_run_only(
        tmp_path, package, section, first, added):
    """Every method's `train_and_evaluate` goes through the engine: a method added to a
    finished comparison is accepted (not a config change), runs alone (the finished sub-run's
    result.json is untouched), and a removed one drops its row; comparison.csv has `method`,
    `seeds`, `test/...` and `_std` columns."""
    from jaxmed import methods
    from jaxmed.config_check import sibling

    module = methods.load(package)
    config = sibling(os.path.join(REPO, "configs", package, "x.py"), "quick").get_config("tiny")
    config[section].methods, config[section].seeds = (first,), (0,)
    w = str(tmp_path)
    module.train_and_evaluate(config, w)
    done = os.path.join(comparison.run_dir(w, first, 0), comparison.RESULT)
    stamp = os.stat(done).st_mtime_ns
    config[section].methods = (first, added)
    assert workdir.check_config(config, w, harmless=module.HARMLESS_KEYS) == []
    module.train_and_evaluate(config, w)
    assert os.stat(done).st_mtime_ns == stamp
    assert comparison.read_result(comparison.run_dir(w, added, 0)) is not None

    def table():
        return list(csv.DictReader(open(os.path.join(w, "report", "comparison.csv"))))

    rows = table()
    assert [r["method"] for r in rows] == [first, added]
    cols = list(rows[0])
    assert cols[:2] == ["method", "seeds"] and rows[0]["seeds"] == "1"
    metric_cols = cols[2:]
    assert metric_cols and all(c.startswith("test/") for c in metric_cols)
    assert all(c + "_std" in cols for c in metric_cols if not c.endswith("_std"))
    config[section].methods = (added,)
    module.train_and_evaluate(config, w)
    assert [r["method"] for r in table()] == [added]


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
