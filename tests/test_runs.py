"""Runs that cannot be mixed: a changed config is refused on resume (or recorded when forced),
two runs cannot share a workdir (a dead run's lock does not block), bad values and unknown
command-line keys stop before anything is written."""

import json
import os
import signal
import subprocess
import sys

import pytest

from jaxmed.train import workdir as workdir_lib
from jaxmed.train.writers import read_metrics
from tests.conftest import REPO, run_python, subprocess_env
from tests.configs import tiny

CLI = ["-m", "jaxmed.main", "--config=tests/configs/tiny.py"]


def cli(workdir, *overrides, check=False):
    return run_python([*CLI, f"--workdir={workdir}", *overrides], check=check)


@pytest.fixture(scope="module")
def eight_step_run(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("runs") / "w")
    cli(w, "--config.train.steps=8", "--config.train.epochs=0", check=True)
    return w


def test_resume_with_changed_lr_is_refused_before_anything_is_written(eight_step_run, tmp_path):
    w = tmp_path / "w"
    subprocess.run(["cp", "-r", eight_step_run, str(w)], check=True)
    before_cfg = (w / "config.json").read_text()
    before_metrics = (w / "metrics.jsonl").read_text()
    before_ckpts = sorted(os.listdir(w / "checkpoints"))
    proc = cli(w, "--config.train.steps=16", "--config.train.epochs=0",
               "--config.train.lr=0.5", "--config.seed=3")
    assert proc.returncode == 2
    assert "train.lr: 0.003 -> 0.5" in proc.stderr and "  seed: 0 -> 3" in proc.stderr
    assert "train.steps" not in proc.stderr  # a longer constant-lr run is the same experiment
    assert (w / "config.json").read_text() == before_cfg
    assert (w / "metrics.jsonl").read_text() == before_metrics
    assert sorted(os.listdir(w / "checkpoints")) == before_ckpts


def test_forced_resume_records_the_change_and_keeps_the_original(eight_step_run, tmp_path):
    w = tmp_path / "w"
    subprocess.run(["cp", "-r", eight_step_run, str(w)], check=True)
    original = json.loads((w / "config.json").read_text())
    cli(w, "--config.train.steps=12", "--config.train.epochs=0", "--config.train.lr=0.5",
        "--allow_config_change", check=True)
    assert json.loads((w / "config.json").read_text()) == original
    (entry,) = [json.loads(x) for x in (w / "config_history.jsonl").read_text().splitlines()]
    assert entry["changes"] == [{"key": "train.lr", "old": 0.003, "new": 0.5}]
    assert entry["config"]["train"]["lr"] == 0.5
    assert max(read_metrics(str(w / "metrics.jsonl"))) >= 12
    # Resuming again with the accepted config needs no flag.
    assert cli(w, "--config.train.steps=12", "--config.train.epochs=0",
               "--config.train.lr=0.5").returncode == 0


def test_which_changes_matter():
    old = json.loads(tiny.get_config().to_json())
    new = json.loads(tiny.get_config().to_json())
    new["train"].update(progress=True, log_every=7, keep_checkpoints=1, epochs=5)
    assert workdir_lib.config_changes(old, new) == []
    new["train"]["epochs"] = 1  # shorter: not the same run
    new["model"]["width"] = 8
    new["data"]["num_workers"] = 4  # the saved data position depends on the worker count
    assert workdir_lib.config_changes(old, new) == [("data.num_workers", 0, 4),
                                                    ("model.width", 4, 8),
                                                    ("train.epochs", 2, 1)]
    study_old = {**old, "method": "prunecxr"}
    study_new = json.loads(json.dumps(study_old))
    study_new["train"]["epochs"] = 5  # a study's finished runs would keep 2 epochs: matters
    assert workdir_lib.config_changes(study_old, study_new) == [("train.epochs", 2, 5)]
    assert workdir_lib.config_changes(study_old, study_new, harmless=("train.epochs",)) == []
    cosine = json.loads(tiny.get_config().to_json())
    cosine["train"]["schedule"] = "cosine"
    longer = json.loads(json.dumps(cosine))
    longer["train"]["epochs"] = 4  # stretches the cosine schedule: matters
    assert workdir_lib.config_changes(cosine, longer) == [("train.epochs", 2, 4)]


def test_a_workdir_from_before_a_key_existed_resumes_at_its_old_behaviour():
    now = json.loads(tiny.get_config().to_json())
    before = json.loads(json.dumps(now))
    for key in ("train_imbalance", "split_seed", "num_classes"):  # added since
        del before["data"][key]
    assert workdir_lib.config_changes(before, now) == []  # 1.0 / 0 / 0: as it was
    now["data"]["train_imbalance"] = 0.5  # a long tail the old run never had
    assert workdir_lib.config_changes(before, now) == [("data.train_imbalance", "<absent>", 0.5)]


def test_a_start_that_failed_before_any_result_leaves_a_fresh_workdir(tmp_path):
    """A first start that wrote config.json and then failed (e.g. a batch that does not split
    over the devices) does not block the corrected rerun."""
    w = tmp_path / "w"
    bad = tiny.get_config()
    bad.train.batch_size = 12
    workdir_lib.write_config(bad, str(w))
    (w / "xla_cache").mkdir()
    good = tiny.get_config()
    assert workdir_lib.check_config(good, str(w)) == []
    workdir_lib.write_config(good, str(w))
    assert json.loads((w / "config.json").read_text())["train"]["batch_size"] == 16
    (w / "checkpoints").mkdir()  # now it holds results: the same change is refused
    with pytest.raises(workdir_lib.ConfigChangedError, match="train.batch_size: 16 -> 12"):
        workdir_lib.check_config(bad, str(w))


def test_second_run_on_a_locked_workdir_stops_naming_the_holder(tmp_path):
    w = str(tmp_path / "w")
    with workdir_lib.lock(w):
        proc = cli(w, "--config.train.steps=2", "--config.train.epochs=0")
    assert proc.returncode == 3
    assert f'"pid": {os.getpid()}' in proc.stderr and "in use by another run" in proc.stderr
    assert not os.path.exists(os.path.join(w, "checkpoints"))


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    w = str(tmp_path / "w")
    code = ("import sys, time; from jaxmed.train import workdir as W\n"
            f"with W.lock({w!r}):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f'"pid": {proc.pid}'):
        with workdir_lib.lock(w):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with workdir_lib.lock(w):  # the dead holder's lock is gone with it
        assert json.loads(open(os.path.join(w, ".lock")).read())["pid"] == os.getpid()


@pytest.mark.parametrize("override, message", [
    ("--config.train.batch_size=0", "config.train.batch_size=0"),
    ("--config.train.batch_size=-32", "config.train.batch_size=-32"),
    ("--config.train.epochs=-1", "config.train.epochs=-1"),
    ("--config.train.eval_batch_size=0", "config.train.eval_batch_size=0"),
    ("--config.train.lr=0", "config.train.lr=0"),
    ("--config.train.early_stop_mode=best", "config.train.early_stop_mode='best'"),
    ("--config.train.learning_rate=0.1", "unknown config key 'train.learning_rate'"),
])
def test_bad_values_and_unknown_keys_stop_in_one_line(tmp_path, override, message):
    proc = cli(tmp_path / "w", override)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_eval_batch_not_divisible_by_devices_names_the_key(tmp_path):
    proc = run_python([*CLI, f"--workdir={tmp_path}/w", "--config.train.eval_batch_size=100"],
                      devices=8, check=False)
    assert proc.returncode != 0
    assert "config.train.eval_batch_size=100" in proc.stderr
