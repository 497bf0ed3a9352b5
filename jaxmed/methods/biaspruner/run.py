"""The continual comparison's driver: every method of `config.continual.methods` once per seed
of `config.continual.seeds` through the same task sequence (`train.comparison.compare`, section
'continual': workdir/runs/<method>/seed_<s>/, finished sub-runs read back from their
result.json), then the report, written by the lead process.

A sub-run trains task after task, saves the state after task t through orbax
(`tasks/<t + 1>`: a re-run resumes there) and evaluates every task seen so far. Its
metrics.jsonl holds `test/acc_task<j>` at step t + 1 (the number of tasks trained) and the
summary (`test/<metric>`) at step T; its result is that flat summary (`test/acc`, `test/bwt`,
`test/eodd`, ...) and, under `details`, the accuracy matrices, the fairness of every task and the
subnetworks' masks report.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil

import jax
import numpy as np

from jaxmed import metrics
from jaxmed.methods.biaspruner import report
from jaxmed.methods.biaspruner.frame import GROUP_KEYS, Method, TaskEval, TaskSequence, evaluate
from jaxmed.methods.biaspruner.tasks import build_tasks
from jaxmed.train import comparison, sharding
from jaxmed.train import run as run_lib
from jaxmed.train.checkpoint import Checkpointer
from jaxmed.train.workdir import write_config

log = logging.getLogger(__name__)
SECTION = "continual"
MATRICES = ("agnostic", "aware", "selection")  # accuracy matrices R[after task i, on task j]
FAIRNESS = ("eopp0", "eopp1", "eodd", "dp_ratio")


WHY_SEQUENTIAL = ("a continual run is a sequence of phases per task (GCE split, pruning, "
                  "fine-tuning) whose sample weights and masks differ per seed")


def run(config, workdir: str, methods: dict[str, Method], *, harmless=()) -> dict:
    """Run the comparison and write workdir/report/; returns (lead process) {'<method>/<metric>':
    mean over seeds, '<method>/<metric>_std' / '_se' / '_n': sample sd, standard error, finite
    values}."""
    write_config(config, workdir, harmless=harmless)
    tasks, info = build_tasks(config)
    attr = config.continual.sensitive_attr
    if attr and attr not in info.attr_names:
        raise ValueError(f"config.continual.sensitive_attr={attr!r} is not an attribute of "
                         f"{info.name}; its attributes: {info.attr_names} ('' skips fairness)")
    seq = TaskSequence(config, tasks, info)
    sharding.check_global_batch(config.train.batch_size, seq.mesh)
    sharding.check_global_batch(config.train.eval_batch_size, seq.mesh, key="eval_batch_size")

    def run_one(name: str, seed: int, run_workdir: str, sub_config) -> dict:
        del seed  # sub_config.seed
        return run_method(seq.with_config(sub_config), run_workdir, name, methods[name])

    write = functools.partial(report.write_report, os.path.join(workdir, "report"),
                              num_tasks=len(tasks), selection=config.continual.task_selection)
    return comparison.compare(workdir, config, SECTION, run_one, write, harmless=harmless,
                              why_sequential=WHY_SEQUENTIAL)


def run_method(seq: TaskSequence, workdir: str, name: str, method: Method) -> dict:
    """Train one method through the task sequence, resuming finished tasks from their orbax
    checkpoints (`workdir/tasks/<t + 1>`: the state after task t); returns its result."""
    setup, state = method.build(seq)
    state = seq.replicate(state)
    t_max = seq.num_tasks
    acc = {k: np.full((t_max, t_max), np.nan) for k in MATRICES}
    evals = []
    store = Checkpointer(os.path.join(workdir, "tasks"), keep=0, async_save=False)
    with run_lib.metric_writer(workdir) as writer:
        writer.resume_from(-1)  # a rerun evaluates every task again: one record per task
        try:
            done = set(store.all_steps())
            for t in range(t_max):
                if t + 1 in done:
                    try:
                        state, _ = store.restore(t + 1, state)
                    except Exception as e:  # noqa: BLE001 (a truncated or deleted file)
                        done = set_aside_from(store, t + 1, e)
                if t + 1 not in done:
                    log.info("%s: task %d / %d", name, t + 1, t_max)
                    state = seq.replicate(method.train_task(seq, setup, state, t,
                                                            os.path.join(workdir, f"task_{t}")))
                    store.save(t + 1, state, meta={"method": name, "task": t})
                    store.wait()
                evals = evaluate(seq, method, setup, state, t)
                for j, e in enumerate(evals):
                    acc["agnostic"][t, j], acc["aware"][t, j], acc["selection"][t, j] = (
                        e.agnostic_acc, e.aware_acc, e.selection_acc)
                writer.write(t + 1, {f"test/acc_task{j}": e.agnostic_acc
                                     for j, e in enumerate(evals)})
        finally:
            store.close()
        summary = {f"test/{k}": v for k, v in summarize_run(acc, evals).items()}
        writer.write(t_max, summary)
    masks = method.mask_report(jax.device_get(state)) if method.mask_report else None
    return {**summary, "details": {**{k: v.tolist() for k, v in acc.items()},
                                   "fairness": [e.fairness for e in evals], "masks": masks}}


def set_aside_from(store: Checkpointer, step: int, error: Exception) -> set[int]:
    """The state after task `step` - 1 does not read back: move it and every later task's
    state (trained from it) to `tasks.unreadable/`, with a warning naming them, so that those
    tasks train again; returns the task states left."""
    later = [s for s in store.all_steps() if s >= step]
    aside = store.directory + ".unreadable"
    print(f"warning: {store.directory}/{step} is unreadable ({type(error).__name__}); "
          f"tasks {later} move to {aside} and train again", flush=True)
    if sharding.is_lead_process():
        os.makedirs(aside, exist_ok=True)
        for s in later:
            target = os.path.join(aside, str(s))
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(store.directory, str(s)), target)
    sharding.barrier("jaxmed_task_states")
    store.manager.reload()
    return set(store.all_steps())


def summarize_run(acc: dict[str, np.ndarray], evals: list[TaskEval]) -> dict:
    """A run's final figures: ACC / BWT / forgetting of the task-agnostic and (aware_) the
    task-aware matrix, task selection (by the method's rule and by entropy), fairness and the
    aligned / conflicting accuracies averaged over the tasks' test sets after the last task."""
    summary = metrics.continual_summary(acc["agnostic"])
    summary.update({f"aware_{k}": v for k, v in metrics.continual_summary(acc["aware"]).items()})
    summary["task_selection"] = float(np.nanmean(acc["selection"][-1]))
    summary["task_selection_entropy"] = float(np.mean([e.selection_entropy_acc for e in evals]))
    for k in FAIRNESS:
        summary[k] = float(np.nanmean([e.fairness[k] for e in evals]))
    for k in GROUP_KEYS:
        vals = [e.groups.get(k, np.nan) for e in evals]
        summary[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return summary


def load_result(run_workdir: str) -> dict | None:
    """A finished sub-run's result.json with its accuracy matrices as numpy; None if it has
    not finished."""
    r = comparison.read_result(run_workdir)
    if r is not None:
        for k in MATRICES:
            r["details"][k] = np.asarray(r["details"][k], np.float64)
    return r
