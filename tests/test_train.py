"""The training floor: sharded steps, multi-process runs, resume after SIGKILL, NaN guard,
config validation, compile-once."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.methods import supervised
from jaxmed.train import sharding
from jaxmed.train.checkpoint import Checkpointer
from jaxmed.train.loop import LoopSettings, NonFiniteLossError, train_loop
from jaxmed.train.writers import MetricWriter, read_metrics
from tests.conftest import REPO, run_python, subprocess_env
from tests.configs import tiny

CLI = ["-m", "jaxmed.main", "--config=tests/configs/tiny.py"]


def final_params(workdir):
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), keep=0)
    state, meta = ck.restore_raw()
    ck.close()
    return state, meta


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One uninterrupted single-process run of the tiny config (shared by several tests)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    run_python([*CLI, f"--workdir={workdir}"])
    return workdir


def test_reference_run_writes_everything(reference_run):
    files = set(os.listdir(reference_run))
    assert {"metrics.jsonl", "config.json", "checkpoints", "tensorboard"} <= files
    assert os.listdir(os.path.join(reference_run, "tensorboard"))
    metrics = read_metrics(os.path.join(reference_run, "metrics.jsonl"))
    last = metrics[max(metrics)]
    assert {"train/loss", "val/auc", "test/balanced_accuracy", "test/auc"} <= set(last)
    assert json.load(open(os.path.join(reference_run, "config.json")))["model"]["width"] == 4


def test_sigkill_then_resume_is_bitwise_equal(reference_run, tmp_path):
    workdir = str(tmp_path / "killed")
    # Killed at step 6, two steps after the checkpoint of step 4 committed.
    proc = run_python(["tests/scripts/train_then_kill.py", workdir, "4", "6"], check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert Checkpointer(os.path.join(workdir, "checkpoints"), keep=0).latest_step() == 4
    resumed = run_python([*CLI, f"--workdir={workdir}"])
    assert "resuming from checkpoint step 4" in resumed.stdout
    got, _ = final_params(workdir)
    want, _ = final_params(reference_run)
    assert int(got["step"]) == int(want["step"]) == 12
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(got["batch_stats"]), jax.tree.leaves(want["batch_stats"])):
        np.testing.assert_array_equal(a, b)


def train_records(workdir):
    """[(step, train/loss)] of every train/ line of metrics.jsonl, in file order."""
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if x.strip()]
    return [(r["step"], r["train/loss"]) for r in lines if "train/loss" in r]


def tensorboard_steps(workdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("wait_for, kill_at, resumed_from", [(4, 6, 4), (0, 3, None)])
def test_a_killed_attempts_records_are_dropped_on_resume(reference_run, tmp_path, wait_for,
                                                         kill_at, resumed_from):
    """Killed between two checkpoints (after the one of step 4 committed, at step 6), or before
    the first checkpoint committed (step 3): the rerun records every train step once, in
    metrics.jsonl and in TensorBoard, with the values of the attempt that survived (= the
    uninterrupted run's, since resume is bitwise)."""
    workdir = str(tmp_path / "killed")
    proc = run_python(["tests/scripts/train_then_kill.py", workdir, str(wait_for),
                       str(kill_at)], check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    dead = train_records(workdir)
    assert dead and dead[-1][0] == (kill_at // 2) * 2  # the dead attempt logged past its ckpt
    resumed = run_python([*CLI, f"--workdir={workdir}"])
    assert (f"resuming from checkpoint step {resumed_from}" in resumed.stdout) == bool(
        resumed_from)
    got, want = train_records(workdir), train_records(reference_run)[:6]
    assert [s for s, _ in got] == [2, 4, 6, 8, 10, 12] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    tb = tensorboard_steps(workdir, "train/loss")
    assert [s for s, _ in tb] == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose([v for _, v in tb], [v for _, v in want], rtol=1e-6)


def test_an_error_mid_run_lets_the_checkpoint_in_flight_commit(tmp_path):
    """A run that fails (a corrupt image) right after starting the save of step 4 still
    commits it: the rerun resumes from step 4, not from scratch."""
    workdir = str(tmp_path / "failed")
    proc = run_python(["tests/scripts/train_then_fail.py", workdir, "4"], check=False)
    assert proc.returncode != 0 and "image 17 of the training set is corrupt" in proc.stderr
    assert Checkpointer(os.path.join(workdir, "checkpoints"), keep=0).latest_step() == 4


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(reference_run, tmp_path):
    """A file of the newest checkpoint truncated: the rerun warns naming it, moves it aside,
    resumes from the step before and ends bitwise where the uninterrupted run did."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference_run, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "12", "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    proc = run_python([*CLI, f"--workdir={workdir}"])
    assert "warning: checkpoint step 12" in proc.stdout and "unreadable" in proc.stdout
    assert "resuming from checkpoint step 8" in proc.stdout
    assert os.path.isdir(os.path.join(workdir, "checkpoints.unreadable", "12"))
    got, _ = final_params(workdir)
    want, _ = final_params(reference_run)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_array_equal(a, b)


def test_rerun_resumes_instead_of_restarting(reference_run):
    before = open(os.path.join(reference_run, "metrics.jsonl")).read()
    proc = run_python([*CLI, f"--workdir={reference_run}"])
    assert "resuming from checkpoint step 12" in proc.stdout
    after = open(os.path.join(reference_run, "metrics.jsonl")).read()
    assert after.startswith(before)  # nothing written before is lost
    assert "train/loss" not in after[len(before):]  # no training step ran again


def test_two_processes_agree_with_one(reference_run, tmp_path):
    workdir = str(tmp_path / "two")
    env = subprocess_env(JAXMED_PORT=str(21000 + os.getpid() % 20000), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/multiprocess_local.sh", "2", "4", CLI[2],
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # Two processes really ran, each with 4 of the 8 devices, each reading half the batch.
    for i in (0, 1):
        assert f"process {i}/2: 4 of 8 devices, 8 rows of each global batch of 16" in proc.stdout
    got, _ = final_params(workdir)
    want, _ = final_params(reference_run)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    m2 = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    m1 = read_metrics(os.path.join(reference_run, "metrics.jsonl"))
    for step in (2, 6, 12):
        assert m2[step]["train/loss"] == pytest.approx(m1[step]["train/loss"], rel=1e-4)


def test_eight_devices_match_one_device(tmp_path):
    """A whole jitted train step (loss, gradients, SGD update, BN statistics) on 8 devices,
    each holding an eighth of the batch, equals the step on one device: every updated
    parameter, every per-leaf gradient it applied, every BN statistic."""
    out = tmp_path / "grads.npz"
    run_python(["tests/scripts/sharded_grads.py", str(out)], devices=8)
    r = np.load(out)
    assert r["devices"] == 8
    assert int(r["shard_devices_8"]) == 8 and r["shard_rows_8"].tolist() == [2] * 8
    assert r["shard_rows_1"].tolist() == [16]
    np.testing.assert_allclose(r["loss_8"], r["loss_1"], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norm_8"], r["grad_norm_1"], rtol=1e-5)
    keys = [k[:-2] for k in r.files if k[:2] in ("p/", "g/") and k.endswith("_8")]
    assert len(keys) > 20 and any("/bn/" in k for k in keys)
    for k in keys:
        # relative to each tensor's scale: the sharded all-reduce sums in another order, so
        # single entries differ by float32 rounding.
        p8, p1 = r[k + "_8"], r[k + "_1"]
        assert np.linalg.norm(p8 - p1) <= 1e-5 * np.linalg.norm(p1), k


@pytest.mark.parametrize("args, key", [
    (["--config=tests/configs/tiny.py", "--config.train.learning_rate=0.1"], "learning_rate"),
    (["--config=tests/configs/typo.py"], "train.learning_rat"),
])
def test_unknown_config_key_is_named(tmp_path, args, key):
    proc = subprocess.run([sys.executable, "-m", "jaxmed.main", *args,
                           f"--workdir={tmp_path}/w"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert key in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # failed before anything ran


@pytest.mark.parametrize("args, line", [
    (["--config.data.synthetic.imbalance=2.0"], "config error: config.data.synthetic.imbalance"),
    # found once the run started (the data file): still one line, exit 2
    (["--config.data.name=medmnist", "--config.data.root=/nonexistent/x.npz"], "error: "),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, line):
    proc = subprocess.run([sys.executable, "-m", "jaxmed.main", "--config=tests/configs/tiny.py",
                           *args, f"--workdir={tmp_path}/w"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(line) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


# ------------------------------------------------------------------ in-process (shared setup)
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    cfg = tiny.get_config()
    run = supervised.build_run(cfg)
    return {"run": run, "initial": jax.device_get(run.state), "config": cfg,
            "mesh": run.mesh, "train_step": run.train_step, "make_stream": run.make_stream,
            "evaluator": run.evaluator}


def fresh_state(s):
    return jax.device_put(s["initial"], sharding.replicated(s["mesh"]))


def test_train_step_compiles_once(tiny_setup):
    s = tiny_setup
    state = fresh_state(s)
    stream = s["make_stream"]()
    losses = []
    with jax.transfer_guard("disallow"):
        for _ in range(4):
            batch = sharding.to_global(next(stream), s["mesh"])
            state, m = s["train_step"](state, batch)
            losses.append(m["loss"])
    assert s["train_step"]._cache_size() == 1
    assert np.all(np.isfinite(jax.device_get(losses)))
    assert int(state.step) == 4


def test_nan_stops_run_naming_step_and_keeps_checkpoint(tiny_setup, tmp_path):
    s = tiny_setup
    real = s["train_step"]

    def poisoned(state, batch):
        state, m = real(state, batch)
        return state, {**m, "loss": jnp.where(state.step == 7, jnp.nan, m["loss"])}

    settings = LoopSettings.from_config(s["config"].train)  # checkpoints every 4 steps
    writer = MetricWriter(str(tmp_path))
    with pytest.raises(NonFiniteLossError, match=r"train/loss is nan at step 7.*step 4"):
        train_loop(workdir=str(tmp_path), settings=settings, state=fresh_state(s),
                   train_step=poisoned, make_stream=s["make_stream"], evaluate=s["evaluator"],
                   mesh=s["mesh"], writer=writer)
    ck = Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=0)
    assert ck.all_steps() == [4]
    state, _ = ck.restore_raw()
    assert int(state["step"]) == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_multilabel_run_reports_map_and_auc(tmp_path):
    cfg = tiny.get_config("multilabel")
    cfg.train.epochs = 1
    result = supervised.train_and_evaluate(cfg, str(tmp_path))
    assert {"test/map", "test/auc", "test/f1"} <= set(result)
    assert 0.0 <= result["test/map"] <= 1.0


@pytest.mark.parametrize("mode, values, best", [
    ("min", [0.9, 0.3, 0.5, 0.7, 0.4, 0.8], 4),   # lowest val/loss at the 2nd evaluation
    ("max", [0.2, 0.6, 0.9, 0.1, 0.9, 0.3], 6),   # highest val/auc at the 3rd (a tie later)
])
def test_early_stopping_keeps_and_tests_the_best_checkpoint(tiny_setup, tmp_path, mode,
                                                            values, best):
    """Scripted validation values: the best evaluation's checkpoint survives `keep=1`, the
    final test evaluation runs on exactly that state (not the last, not the worst), and a
    later workdir load (`pretrained=workdir`) gets the same weights."""
    from jaxmed.train import build

    s = tiny_setup
    script = iter(values)
    tested = {}

    def evaluate(state, split):
        if split == "test":
            tested["step"] = int(jax.device_get(state.step))
            tested["params"] = jax.device_get(state.params)
            return {"accuracy": 0.5}
        return {"metric": next(script)}

    cfg = s["config"]
    settings = LoopSettings.from_config(cfg.train)
    settings.eval_every, settings.checkpoint_every, settings.keep_checkpoints = 2, 5, 1
    settings.early_stop_metric, settings.early_stop_mode = "val/metric", mode
    writer = MetricWriter(str(tmp_path))
    train_loop(workdir=str(tmp_path), settings=settings, state=fresh_state(s),
               train_step=s["train_step"], make_stream=s["make_stream"], evaluate=evaluate,
               mesh=s["mesh"], writer=writer)
    writer.close()
    assert tested["step"] == best
    ck = Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=0)
    assert ck.best_step() == best and best in ck.all_steps() and 12 in ck.all_steps()
    saved, _ = ck.restore_raw(best)
    ck.close()
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(tested["params"])):
        np.testing.assert_array_equal(a, b)
    loaded = build.load_workdir_variables(str(tmp_path))
    for a, b in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(tested["params"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("poison", ["loss", "params"])
def test_nan_guard_when_log_every_does_not_divide_checkpoint_every(tiny_setup, tmp_path, poison):
    """log_every=3, checkpoint_every=4: a NaN at step 7 (in the loss, or in the weights after
    an update whose loss was still finite) is caught before the step-8 checkpoint is written."""
    s = tiny_setup
    real = s["train_step"]

    def poisoned(state, batch):
        state, m = real(state, batch)
        if poison == "loss":
            return state, {**m, "loss": jnp.where(state.step == 7, jnp.nan, m["loss"])}
        bad = jax.tree.map(lambda p: jnp.where(state.step == 7, jnp.nan, p), state.params)
        state = state.replace(params=bad)
        return state, {**m, "param_norm": jnp.where(state.step == 7, jnp.nan,
                                                    m["param_norm"])}

    settings = LoopSettings.from_config(s["config"].train)
    settings.log_every, settings.checkpoint_every = 3, 4
    key = "loss" if poison == "loss" else "param_norm"
    with pytest.raises(NonFiniteLossError, match=rf"train/{key} is nan at step 7.*step 4"):
        train_loop(workdir=str(tmp_path), settings=settings, state=fresh_state(s),
                   train_step=poisoned, make_stream=s["make_stream"], evaluate=s["evaluator"],
                   mesh=s["mesh"], writer=MetricWriter(str(tmp_path)))
    ck = Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=0)
    assert ck.all_steps() == [4]
    state, _ = ck.restore_raw()
    ck.close()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_train_step_reports_the_norm_of_the_updated_params(tiny_setup):
    """The guard's param_norm is the norm of the weights the step produced (a NaN weight
    shows there even when the loss, computed before the update, is finite)."""
    s = tiny_setup
    state = fresh_state(s)
    batch = sharding.to_global(next(s["make_stream"]()), s["mesh"])
    new, m = s["train_step"](state, batch)
    want = np.sqrt(sum(float(np.sum(np.square(x))) for x in
                       jax.tree.leaves(jax.device_get(new.params))))
    assert float(m["param_norm"]) == pytest.approx(want, rel=1e-5)


def test_sigkill_mid_pruning_schedule_with_grain_workers_resumes_bitwise(tmp_path):
    """Gradual pruning (events at steps 2, 4, ..., 10) with 2 grain worker processes: killed at
    step 6 after the step-4 checkpoint, the resumed run ends with the same weights, masks and
    BN statistics as an uninterrupted run (masks and data position come from the checkpoint)."""
    cli = ["-m", "jaxmed.main", "--config=tests/configs/tiny.py:pruned_workers"]
    ref = str(tmp_path / "ref")
    run_python([*cli, f"--workdir={ref}"])
    workdir = str(tmp_path / "killed")
    # Its own session: the grain workers the SIGKILL orphans are killed with the group
    # afterwards (they would otherwise hold the output pipes open).
    proc = subprocess.Popen([sys.executable, "tests/scripts/train_then_kill.py", workdir, "4",
                             "6", "pruned_workers"], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        assert proc.wait(timeout=300) == -9
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert Checkpointer(os.path.join(workdir, "checkpoints"), keep=0).latest_step() == 4
    resumed = run_python([*cli, f"--workdir={workdir}"])
    assert "resuming from checkpoint step 4" in resumed.stdout
    got, _ = final_params(workdir)
    want, _ = final_params(ref)
    assert int(got["step"]) == int(want["step"]) == 12
    masks = [m for m in jax.tree.leaves(got["masks"]) if m.dtype == bool]
    assert masks and 0.7 < 1 - sum(m.sum() for m in masks) / sum(m.size for m in masks) < 0.8
    for part in ("params", "masks", "batch_stats"):
        for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part]), strict=True):
            np.testing.assert_array_equal(a, b)


def test_fixmatch_cosine_schedule_and_kernel_only_weight_decay():
    """build: lr cos(7 pi k / 16 K) (TEAR / FixMatch) and weight decay limited to kernels by
    `decay_mask` (a zero gradient moves a kernel, never a bias)."""
    import optax

    from jaxmed.train import build

    t = supervised.default_config().train
    t.lr, t.schedule, t.optimizer = 0.1, "fixmatch_cosine", "sgd"
    t.momentum, t.weight_decay = 0.0, 0.5
    lr = build.learning_rate(t, 40)
    np.testing.assert_allclose([lr(0), lr(20), lr(40)],
                               [0.1, 0.1 * np.cos(7 * np.pi / 32), 0.1 * np.cos(7 * np.pi / 16)],
                               rtol=1e-6)
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"bias": jnp.ones(2)}}
    tx = build.make_optimizer(t, 40, decay_mask=build.kernels_only)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["conv"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(new["bn"]["bias"], 1.0)
