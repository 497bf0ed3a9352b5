"""What a run keeps in its workdir beside checkpoints: `config.json`, the history of accepted
config changes, and the lock that keeps two runs out of one workdir.

A workdir belongs to one experiment. On resume the new config is compared with the one the
workdir holds; a key that changes the experiment stops the run before anything is written,
listing each differing key with its old and new value. Keys that cannot change results may
differ (`HARMLESS`, and a method's own `HARMLESS_KEYS`), and so may `train.epochs` /
`train.steps` of a supervised run when they grow under a schedule that does not depend on the
run's length (`schedule='constant'`; a cosine schedule is stretched by its total). A workdir in
which a run failed before writing any result counts as fresh. `--allow_config_change` resumes
anyway: `config.json` keeps the original and `config_history.jsonl` records each accepted
change with the time and host.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any

from flax import traverse_util

from jaxmed.config_check import UserError
from jaxmed.train import sharding

# Keys that change how a run is observed or scheduled on the machine, never what it computes.
# (Not data.num_workers: the saved data-iterator position depends on the worker count.)
HARMLESS = ("train.progress", "train.log_every", "train.checkpoint_every",
            "train.keep_checkpoints")
LENGTH_KEYS = ("train.epochs", "train.steps")
# Keys added after workdirs were written, each with the value that does what the library did
# before it existed: absent from a workdir's config and at this value now is no change (so a
# workdir from before resumes). A key whose default changed behaviour (ssl.eval_ema,
# kd.cb_reduction) is not listed: absent -> default is a change there.
ADDED_KEYS = {"data.num_classes": 0, "data.train_imbalance": 1.0, "data.split_seed": 0,
              "data.synthetic_bias.patch_size": 0, "kd.w_kd_ramp": 0.0,
              "kd.teacher_classes": [], "continual.bias_score": "paper"}
HISTORY = "config_history.jsonl"
# What a run that failed before producing anything leaves behind: such a workdir is fresh.
NO_RESULTS = {"config.json", HISTORY, ".lock", "xla_cache", "tensorboard"}


class ConfigChangedError(ValueError, UserError):
    """The workdir holds another experiment's config."""


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _as_json(config) -> dict:
    return json.loads(config.to_json())


def has_results(workdir: str) -> bool:
    """Whether a run in `workdir` got as far as writing results (checkpoints, metrics, reports,
    a sub-run with results): a start that failed before that (a bad batch size, say) leaves a
    fresh workdir, a comparison's included (its sub-runs' folders hold only their config)."""
    if not os.path.isdir(workdir):
        return False
    rest = set(os.listdir(workdir)) - NO_RESULTS
    if rest == {"runs"}:  # a comparison: results only if one of its sub-runs has some
        runs = os.path.join(workdir, "runs")
        return any(has_results(os.path.join(runs, m, s)) for m in os.listdir(runs)
                   if os.path.isdir(os.path.join(runs, m))
                   for s in os.listdir(os.path.join(runs, m)))
    return bool(rest)


def effective_config(workdir: str) -> dict | None:
    """The config the workdir's run is under: config.json, with the last accepted change;
    None for a fresh workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not has_results(workdir):
        return None
    with open(path) as f:
        config = json.load(f)
    hist = os.path.join(workdir, HISTORY)
    if os.path.exists(hist):
        with open(hist) as f:
            lines = [json.loads(x) for x in f if x.strip()]
        if lines:
            config = lines[-1]["config"]
    return config


def config_changes(old: dict, new: dict, harmless: tuple[str, ...] = ()
                   ) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every key that differs and may change the experiment's results;
    `harmless` adds a method's own keys that never do (e.g. PruneCXR's `stages`)."""
    a, b = (traverse_util.flatten_dict(t, sep=".") for t in (old, new))
    changed = [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
               if a.get(k, "<absent>") != b.get(k, "<absent>")]
    # A longer run continues the same experiment only for one supervised run under a constant
    # learning rate (a study of several runs, supervised seeds included, would mix finished
    # short runs with long ones).
    constant = (b.get("train.schedule", "constant") == "constant" == a.get(
        "train.schedule", "constant") and a.get("method") == b.get("method") == "supervised"
        and not a.get("supervised.seeds") and not b.get("supervised.seeds"))

    def matters(key, was, now):
        if key in HARMLESS or key in harmless:
            return False
        if was == "<absent>" and key in ADDED_KEYS and now == ADDED_KEYS[key]:
            return False
        if key in LENGTH_KEYS and constant and isinstance(was, int) and isinstance(now, int):
            # a longer run of the same experiment (steps: only if it was step-driven already)
            return not (now >= was and (was > 0 or key == "train.epochs"))
        return True

    return [c for c in changed if matters(*c)]


def check_config(config, workdir: str, *, allow_changed: bool = False,
                 harmless: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """The changes (key, old, new) of `config` against the workdir's run that may change its
    results; raises ConfigChangedError listing them unless `allow_changed`. Writes nothing."""
    old = effective_config(workdir)
    if old is None:
        return []
    changes = config_changes(old, _as_json(config), harmless)
    if changes and not allow_changed:
        listing = "\n".join(f"  {k}: {was!r} -> {now!r}" for k, was, now in changes)
        raise ConfigChangedError(
            f"{workdir} holds a run with another config; resuming would mix two experiments. "
            f"Differing keys (workdir -> now):\n{listing}\nUse a new --workdir, or pass "
            "--allow_config_change to resume anyway (the change is recorded in "
            f"{HISTORY}).")
    return changes


def write_config(config, workdir: str, *, allow_changed: bool = False,
                 harmless: tuple[str, ...] = ()) -> None:
    """Write `workdir/config.json` for a new run; for a resumed run, check the config against
    the workdir's (`check_config`) and never overwrite it: an accepted change goes to
    `config_history.jsonl`. Lead process only."""
    if not sharding.is_lead_process():
        return
    new = _as_json(config)
    if effective_config(workdir) is None:
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(os.path.join(workdir, HISTORY)):  # left by a start that failed
            os.remove(os.path.join(workdir, HISTORY))
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json(indent=2))
        os.replace(path + ".tmp", path)
        return
    changes = check_config(config, workdir, allow_changed=allow_changed, harmless=harmless)
    if not changes:
        return
    with open(os.path.join(workdir, HISTORY), "a") as f:
        f.write(json.dumps({
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "changes": [{"key": k, "old": was, "new": now} for k, was, now in changes],
            "config": new}) + "\n")


@contextlib.contextmanager
def lock(workdir: str):
    """Hold `workdir/.lock` for the run: an OS file lock (released by the kernel when the
    process dies, so a killed run never blocks the next one) plus the holder's host and pid
    for the message a second run gets."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path) as f:
                holder = f.read().strip() or "unknown"
            raise WorkdirLockedError(
                f"{workdir} is in use by another run ({holder}); wait for it to finish or use "
                "another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": datetime.datetime.now().isoformat(
                                     timespec="seconds")}).encode())
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # releases the lock
