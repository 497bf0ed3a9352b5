"""The seed axis (`jaxmed.train.seeds`): S seeds trained as one program are the S sequential
runs (per-seed metrics and params), compiled once, each seed selecting and stopping on its
own, resumable after SIGKILL, placed on the mesh's `seed` axis; TEAR, FoPro-KD and a continual
baseline (EWC) through it."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxmed.train import comparison, seeds
from jaxmed.train import run as run_lib
from jaxmed.train.checkpoint import Checkpointer
from jaxmed.train.writers import read_metrics
from tests.configs import tiny
from tests.conftest import run_python

SEEDS = (0, 1, 2)


def flat(params) -> dict:
    return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def assert_params_close(a, b, atol=2e-3, noise_driven=()):
    """Leaf by leaf; `noise_driven` leaves (a bias right before a BatchNorm, whose gradient is 0
    up to rounding, which Adam's normalised step turns into +-lr moves) only keep their shape."""
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for k in b:
        if k in noise_driven:
            assert a[k].shape == b[k].shape
            continue
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-3, err_msg=k)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The reference: each seed of the tiny supervised config trained alone by `fit`."""
    d = tmp_path_factory.mktemp("sequential")
    return {s: (*run_lib.fit(run_lib.build_run(tiny.get_config(), s), str(d / f"seed_{s}")),
                str(d / f"seed_{s}")) for s in SEEDS}


SCRIPT = "tests/scripts/seeds_group.py"


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """tests/scripts/seeds_group.py uninterrupted: seeds 0, 1 in one process."""
    out = str(tmp_path_factory.mktemp("script"))
    run_python([SCRIPT, out, "0,1"])
    return out


@pytest.mark.parametrize("batching", ["unroll", "vmap"])
def test_seeds_in_one_program_are_the_sequential_runs(sequential, tmp_path, batching):
    traces = []
    runs = []
    for s in SEEDS:
        r = run_lib.build_run(tiny.get_config(), s)

        def counted(state, batch, _step=r.step):
            traces.append(1)  # once per trace of the group's program (unroll: once per seed)
            return _step(state, batch)
        runs.append(dataclasses.replace(r, step=counted))
    dirs = [str(tmp_path / f"seed_{s}") for s in SEEDS]
    out = seeds.fit_seeds(runs, dirs, str(tmp_path / "group"), batching=batching)
    assert len(traces) == (len(SEEDS) if batching == "unroll" else 1)  # compiled once
    for s, d, (state, final) in zip(SEEDS, dirs, out):
        want_state, want, want_dir = sequential[s]
        assert final.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(final[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)
        assert_params_close(state.params, want_state.params)
        got_m, want_m = read_metrics(f"{d}/metrics.jsonl"), read_metrics(f"{want_dir}/metrics.jsonl")
        assert got_m.keys() == want_m.keys()  # the same steps logged, each in its own file
        for step in want_m:
            for k, v in want_m[step].items():
                if k != "train/images_per_sec":
                    np.testing.assert_allclose(got_m[step][k], v, rtol=1e-3, atol=1e-4,
                                               err_msg=f"{k} at {step}")
    assert len({round(f["loss"], 6) for _, f in out}) == len(SEEDS)  # each seed its own run


def planted(run, best_at: int):
    """The run with a planted validation loss |step - best_at| and a test split that reports
    the step of the state it is given (the state final evaluation selected)."""
    def evaluate(state, split):
        step = int(jax.device_get(state.step))
        return {"loss": float(abs(step - best_at))} if split == "val" else {"step": step}
    return dataclasses.replace(run, evaluate=evaluate)


def test_each_seed_selects_and_stops_on_its_own(tmp_path):
    cfg = tiny.get_config()
    cfg.train.eval_every, cfg.train.early_stop_metric, cfg.train.patience = 2, "val/loss", 2
    best = {0: 2, 1: 8, 2: 4}  # seed 0 stops at step 6, seed 2 at 8, seed 1 runs to 12

    def runs():
        return [planted(run_lib.build_run(cfg, s), best[s]) for s in SEEDS]
    dirs = [str(tmp_path / f"par_{s}") for s in SEEDS]
    out = seeds.fit_seeds(runs(), dirs, str(tmp_path / "group"))
    seq = [run_lib.fit(r, str(tmp_path / f"seq_{s}")) for s, r in zip(SEEDS, runs())]
    for s, d, (state, final), (want_state, want) in zip(SEEDS, dirs, out, seq):
        assert final["step"] == want["step"] == best[s]
        assert_params_close(state.params, want_state.params)
        train_steps = [k for k, v in read_metrics(f"{d}/metrics.jsonl").items()
                       if "train/loss" in v]
        assert max(train_steps) == {0: 6, 1: 12, 2: 8}[s]  # a stopped seed logs no more
    ck = Checkpointer(str(tmp_path / "group" / "checkpoints"), keep=0)
    saved, meta = ck.restore_raw()
    ck.close()
    # a stopped seed is frozen in the stacked state (not trained on while the others go on)
    np.testing.assert_array_equal(saved["state"]["step"], [6, 12, 8])
    np.testing.assert_array_equal(saved["best"]["step"], [2, 8, 4])
    assert [b["best_step"] for b in meta["loop"]["seeds"]] == [2, 8, 4]

    # a crash at the 10th batch (seed 0 stopped, the others not) and a rerun: resumed from
    # step 8 with the books, the best states and the iterators, the uninterrupted result
    crashing = runs()
    crashing[0] = dataclasses.replace(crashing[0], make_stream=failing(crashing[0].make_stream,
                                                                       10))
    again = [str(tmp_path / f"again_{s}") for s in SEEDS]
    with pytest.raises(Boom):
        seeds.fit_seeds(crashing, again, str(tmp_path / "again"))
    resumed = seeds.fit_seeds(runs(), again, str(tmp_path / "again"))
    for d, d2, (a, fa), (b, fb) in zip(dirs, again, out, resumed):
        assert fa == fb
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_array_equal(x, y)
        m1, m2 = read_metrics(f"{d}/metrics.jsonl"), read_metrics(f"{d2}/metrics.jsonl")
        assert m1.keys() == m2.keys()
        for step in m1:
            assert {k: v for k, v in m1[step].items() if k != "train/images_per_sec"} == \
                {k: v for k, v in m2[step].items() if k != "train/images_per_sec"}


class Boom(Exception):
    pass


def failing(make_stream, at: int):
    """make_stream whose iterator raises at its `at`-th batch (a crash between steps)."""
    def make():
        stream = make_stream()
        inner, count = stream.iterator, [0]

        class Failing:
            def __next__(self):
                count[0] += 1
                if count[0] == at:
                    raise Boom
                return next(inner)

            def __getattr__(self, name):
                return getattr(inner, name)
        stream.iterator = Failing()
        return stream
    return make


def test_a_seed_that_goes_non_finite_is_named(tmp_path):
    runs = [run_lib.build_run(tiny.get_config(), s) for s in (0, 5)]
    bad = runs[1].state.replace(params=jax.tree.map(lambda x: x * np.float32(np.inf),
                                                    runs[1].state.params))
    runs[1] = dataclasses.replace(runs[1], state=bad)  # seed 5 alone is non-finite
    with pytest.raises(FloatingPointError, match=r"seed 5 \(.*par_5\): train/"):
        seeds.fit_seeds(runs, [str(tmp_path / f"par_{s}") for s in (0, 5)],
                        str(tmp_path / "group"))


def test_runs_that_cannot_stack_say_why():
    cfg = tiny.get_config()
    r = run_lib.build_run(cfg, 0)
    assert "pure function" in seeds.cannot_stack([r, dataclasses.replace(r, step=None)])
    cfg.pruning.criterion = "magnitude"
    pruned = run_lib.build_run(cfg, 1)
    assert "state hooks" in seeds.cannot_stack([pruned, pruned])
    assert seeds.cannot_stack([r, run_lib.build_run(tiny.get_config(), 1)]) == ""


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load(out, group):
    with np.load(os.path.join(out, group, "result.npz")) as z:
        return {k: z[k] for k in z.files}


def test_sigkill_mid_group_then_resume_gives_the_uninterrupted_result(script_run, tmp_path):
    full, killed = script_run, str(tmp_path / "killed")
    # killed at the fetch of batch 7, after the checkpoint of step 4 committed
    proc = run_python([SCRIPT, killed, "0,1", "4", "7"], check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    resumed = run_python([SCRIPT, killed, "0,1"])
    assert "resuming 2 seeds from checkpoint step 4" in resumed.stdout
    a, b = load(full, "seeds_0-1"), load(killed, "seeds_0-1")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = sorted(read_metrics(os.path.join(killed, "seeds_0-1", "seed_1", "metrics.jsonl")))
    assert steps == sorted(read_metrics(os.path.join(full, "seeds_0-1", "seed_1",
                                                     "metrics.jsonl")))


def test_eight_devices_put_the_seeds_on_the_seed_axis(sequential, tmp_path):
    out = str(tmp_path / "eight")
    run_python([SCRIPT, out, "0,1,2,3;0,1,2,3,4,5,6,7"], devices=8)
    four, eight = (read_json(os.path.join(out, g, "placement.json"))
                   for g in ("seeds_0-1-2-3", "seeds_0-1-2-3-4-5-6-7"))
    assert four["mesh"] == {"seed": 4, "data": 2} and eight["mesh"] == {"seed": 8, "data": 1}
    assert four["spec"][0] == eight["spec"][0] == "seed"
    assert four["seed_devices"] == {str(i): [2 * i, 2 * i + 1] for i in range(4)}
    assert eight["seed_devices"] == {str(i): [i] for i in range(8)}
    for group in ("seeds_0-1-2-3", "seeds_0-1-2-3-4-5-6-7"):
        got = load(out, group)
        for s in SEEDS:  # each seed on its devices is still the sequential run
            want_state, want, _ = sequential[s]
            np.testing.assert_allclose(got[f"{s}/test_loss"], want["loss"], rtol=1e-4)
            for k, v in flat(want_state.params).items():
                np.testing.assert_allclose(got[f"{s}/{k}"], v, atol=2e-3, rtol=1e-3)


def test_one_cpu_device_runs_seeds_one_after_another_unless_asked(monkeypatch):
    mesh = seeds.seed_mesh(3, jax.devices()[:1])
    assert dict(mesh.shape) == {"seed": 1, "data": 1}
    monkeypatch.delenv(seeds.ON_CPU, raising=False)
    assert seeds.default_batching(mesh) == ""  # measured slower there (RESULTS.md)
    monkeypatch.setenv(seeds.ON_CPU, "unroll")
    assert seeds.default_batching(mesh) == "unroll"
    monkeypatch.setenv(seeds.ON_CPU, "pmap")
    with pytest.raises(ValueError, match="JAXMED_SEEDS_ON_CPU='pmap'"):
        seeds.default_batching(mesh)


def read_results(workdir, method, seeds_):
    return [comparison.read_result(comparison.run_dir(workdir, method, s)) for s in seeds_]


def with_seeds(config, section: str, methods: tuple, parallel: bool):
    c = config.copy_and_resolve_references()
    c[section].methods, c[section].seeds, c[section].parallel_seeds = methods, (0, 1), parallel
    return c


def both_ways(train_and_evaluate, config, section: str, methods: tuple, tmp_path) -> dict:
    """{parallel_seeds: workdir} of the comparison of `methods` with seeds 0, 1 run with the
    seed axis on and off; each method's group directory exists only when it is on."""
    out = {}
    for par in (True, False):
        out[par] = w = str(tmp_path / str(par))
        train_and_evaluate(with_seeds(config, section, methods, par), w)
        for m in methods:
            assert os.path.isdir(comparison.group_dir(w, m, (0, 1))) == par
    return out


def test_tear_algorithm_with_memories_parallel_is_sequential(tmp_path, monkeypatch):
    from configs.tear import quick
    from jaxmed.methods import tear

    monkeypatch.setenv(seeds.ON_CPU, "unroll")  # (one CPU device: else one after another)
    got = {par: read_results(w, "flexmatch", (0, 1)) for par, w in both_ways(
        tear.train_and_evaluate, quick.get_config("tiny"), "ssl", ("flexmatch",), tmp_path).items()}
    for a, b in zip(got[True], got[False]):
        for k, v in b.items():
            if k.startswith("test/"):
                np.testing.assert_allclose(a[k], v, atol=1e-4, err_msg=k)
    assert got[True][0]["test/loss"] != got[True][1]["test/loss"]


def test_ekd_with_a_shared_teacher_parallel_is_sequential(tmp_path):
    from jaxmed import data as data_lib
    from jaxmed.methods.fopro_kd import run as kd_run
    from jaxmed.methods.fopro_kd import teachers
    from jaxmed.train import sharding
    from tests.test_fopro_kd import tiny_config

    config = tiny_config()
    teacher = teachers.from_workdir(teachers.train_teacher_stage(config, str(tmp_path / "t")),
                                    config.data.image_size)
    ds, mesh = data_lib.build(config.data), sharding.make_mesh()

    def runs(tag):
        return [kd_run.build_student_run("ekd", s, str(tmp_path / f"{tag}{s}"), config, ds=ds,
                                         teacher_model=teacher, mesh=mesh) for s in (0, 1)]
    par_runs = runs("p")
    assert par_runs[0].step_args[0] is par_runs[1].step_args[0]  # one teacher, not stacked
    par = seeds.fit_seeds(par_runs, [str(tmp_path / f"p{s}") for s in (0, 1)],
                          str(tmp_path / "group"), batching="vmap")  # the teacher in_axes None
    seq = [run_lib.fit(r, str(tmp_path / f"s{s}")) for s, r in zip((0, 1), runs("s"))]
    for (a, fa), (b, fb) in zip(par, seq):
        for k in fb:
            np.testing.assert_allclose(fa[k], fb[k], atol=1e-4, err_msg=k)
        assert_params_close(a.params, b.params, noise_driven=("student/heads/p_0/bias",))


def task_states(workdir: str, method: str, seed: int) -> list[dict]:
    """A continual sub-run's saved state after each of the two tasks."""
    ck = Checkpointer(os.path.join(comparison.run_dir(workdir, method, seed), "tasks"))
    try:
        return [ck.restore_raw(t)[0] for t in (1, 2)]
    finally:
        ck.close()


def test_continual_baselines_parallel_are_sequential(tmp_path, monkeypatch):
    """EWC and LwF through the comparison engine: each task of their two seeds trains as one
    program (each seed's Fisher and anchor, or teacher, stacked in the task's inputs) and every
    seed ends as it does alone: accuracy matrices, summary, the saved state after each task.
    A seed whose last task's state was lost (a crash between the seeds' saves) retrains it
    alone from its phase's own finished checkpoint, to the same result."""
    from configs.biaspruner import quick
    from jaxmed.methods import biaspruner

    monkeypatch.setenv(seeds.ON_CPU, "unroll")  # (one CPU device: else one after another)
    methods = ("ewc", "lwf")
    ws = both_ways(biaspruner.train_and_evaluate, quick.get_config("tiny"), "continual",
                   methods, tmp_path)
    for m in methods:
        g = comparison.group_dir(ws[True], m, (0, 1))
        assert all(os.path.isdir(os.path.join(g, f"task_{t}", "seeds_0-1", "checkpoints"))
                   for t in (0, 1))
        got = {par: read_results(w, m, (0, 1)) for par, w in ws.items()}
        for a, b in zip(got[True], got[False]):
            for k, v in b.items():
                if k.startswith("test/"):
                    np.testing.assert_allclose(a[k], v, atol=1e-6, err_msg=f"{m} {k}")
            np.testing.assert_allclose(a["details"]["agnostic"], b["details"]["agnostic"])
        for s in (0, 1):
            for a, b in zip(task_states(ws[True], m, s), task_states(ws[False], m, s)):
                assert_params_close(a["params"], b["params"])
                for part in ("fisher", "anchor"):  # Fisher values are small: relative
                    fa, fb = flat(a[part]), flat(b[part])
                    for k in fb:
                        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-2,
                                                   atol=1e-3 * np.abs(fb[k]).max(), err_msg=k)
                assert int(a["stored"]) == int(b["stored"])
    fisher = task_states(ws[True], "ewc", 0)[1]["fisher"]
    assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(fisher)) > 0
    # seed 1 of EWC lost its state after task 1 (and so its result): the rerun trains that task
    # alone, finds the phase finished in its own workdir and ends as before
    run1 = comparison.run_dir(ws[True], "ewc", 1)
    before = comparison.read_result(run1)
    shutil.rmtree(os.path.join(run1, "tasks", "2"))
    os.remove(os.path.join(run1, "result.json"))
    biaspruner.train_and_evaluate(with_seeds(quick.get_config("tiny"), "continual", methods,
                                             True), ws[True])
    assert not os.path.exists(os.path.join(run1, "task_1", "train", "checkpoints.unreadable"))
    again = comparison.read_result(run1)
    for k, v in before.items():
        if k.startswith("test/"):
            np.testing.assert_allclose(again[k], v, atol=1e-7, err_msg=k)


def test_supervised_seeds_are_a_comparison_of_the_plain_runs(sequential, tmp_path, monkeypatch):
    """`config.supervised.seeds`: each seed's result is its plain run's (bitwise alone, within
    float tolerance on the seed axis), comparison.csv holds their mean and sd, and a workdir of
    seeds is not reused for one run."""
    import csv

    from jaxmed.methods import supervised
    from jaxmed.train import workdir as workdir_lib

    monkeypatch.setenv(seeds.ON_CPU, "unroll")  # (one CPU device: else one after another)
    ws = both_ways(supervised.train_and_evaluate, tiny.get_config(), "supervised",
                   ("supervised",), tmp_path)
    for par, w in ws.items():
        got = read_results(w, "supervised", (0, 1))
        for s, r in zip((0, 1), got):
            for k, v in sequential[s][1].items():
                np.testing.assert_allclose(r[f"test/{k}"], v, atol=1e-4 if par else 0, err_msg=k)
        with open(os.path.join(w, "report", "comparison.csv")) as f:
            (row,) = list(csv.DictReader(f))
        losses = [r["test/loss"] for r in got]
        assert row["method"] == "supervised" and row["seeds"] == "2"
        np.testing.assert_allclose(float(row["test/loss"]), np.mean(losses), rtol=1e-5)
        np.testing.assert_allclose(float(row["test/loss_std"]), np.std(losses, ddof=1),
                                   rtol=1e-4)
    with pytest.raises(workdir_lib.ConfigChangedError, match=r"supervised\.seeds=\(\)"):
        supervised.train_and_evaluate(tiny.get_config(), ws[False])
    # nor after an accepted config change (the layout is read from disk)
    one = tiny.get_config()
    one.train.lr = 1e-3
    workdir_lib.write_config(one, ws[False], allow_changed=True,
                             harmless=supervised.HARMLESS_KEYS)
    with pytest.raises(workdir_lib.ConfigChangedError, match="holds a comparison of seeds"):
        supervised.train_and_evaluate(one, ws[False])
    # a supervised workdir from before the seeds' keys resumes without a change
    old = json.loads(tiny.get_config().to_json())
    del old["supervised"]
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(old))
    (d / "metrics.jsonl").write_text("")
    assert workdir_lib.check_config(tiny.get_config(), str(d),
                                    harmless=supervised.HARMLESS_KEYS) == []
