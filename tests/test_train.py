"""The training floor: sharded steps, multi-process runs, resume after SIGKILL, NaN guard,
config validation, compile-once."""

import json
import os
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


def test_rerun_resumes_instead_of_restarting(reference_run):
    before = open(os.path.join(reference_run, "metrics.jsonl")).read()
    proc = run_python([*CLI, f"--workdir={reference_run}"])
    assert "resuming from checkpoint step 12" in proc.stdout
    after = open(os.path.join(reference_run, "metrics.jsonl")).read()
    assert after.startswith(before)  # nothing written before is lost
    assert "train/loss" not in after[len(before):]  # no training step ran again


def test_two_processes_agree_with_one(reference_run, tmp_path):
    workdir = str(tmp_path / "two")
    env = subprocess_env(JAXMED_PORT=str(21000 + os.getpid() % 20000))
    proc = subprocess.run(["bash", "launch/multiprocess_local.sh", "2", "4", CLI[2],
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    got, _ = final_params(workdir)
    want, _ = final_params(reference_run)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    m2 = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    m1 = read_metrics(os.path.join(reference_run, "metrics.jsonl"))
    for step in (2, 6, 12):
        assert m2[step]["train/loss"] == pytest.approx(m1[step]["train/loss"], rel=1e-4)


def test_eight_devices_match_one_device(tmp_path):
    out = tmp_path / "grads.npz"
    run_python(["tests/scripts/sharded_grads.py", str(out)], devices=8)
    r = np.load(out)
    assert r["devices"] == 8
    np.testing.assert_allclose(r["loss_8"], r["loss_1"], rtol=1e-5)
    keys = [k[:-2] for k in r.files if k.startswith("g/") and k.endswith("_8")]
    assert len(keys) > 10
    for k in keys:
        # rtol 1e-5 relative to each tensor's scale: the sharded all-reduce sums in another
        # order, so single entries that nearly cancel differ by float32 rounding (~1e-7 abs).
        g8, g1 = r[k + "_8"], r[k + "_1"]
        assert np.linalg.norm(g8 - g1) <= 1e-5 * np.linalg.norm(g1), k
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5 * np.abs(g1).max())


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


# ------------------------------------------------------------------ in-process (shared setup)
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    cfg = tiny.get_config()
    s = supervised.setup(cfg, str(tmp_path_factory.mktemp("setup")))
    s["initial"] = jax.device_get(s["state"])
    s["config"] = cfg
    return s


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
