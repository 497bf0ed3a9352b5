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

Seeds: a method whose task is one training phase (the baselines: fine-tune, joint, EWC, LwF)
trains its seeds' tasks together on the seed axis (`run_seeds`, where the backend gains from
it: `train.seeds.backend_reason`); BiasPruner, PackNet and LfF run their seeds one after
another (`WHY_SEQUENTIAL`).
"""

from __future__ import annotations

import contextlib
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
from jaxmed.train import seeds as train_seeds
from jaxmed.train.checkpoint import Checkpointer
from jaxmed.train.workdir import write_config

log = logging.getLogger(__name__)
SECTION = "continual"
MATRICES = ("agnostic", "aware", "selection")  # accuracy matrices R[after task i, on task j]
FAIRNESS = ("eopp0", "eopp1", "eodd", "dp_ratio")


WHY_SEQUENTIAL = ("a BiasPruner-like run is a sequence of phases per task (GCE split, pruning, "
                  "fine-tuning) whose sample weights and masks differ per seed")


def why_sequential(method: Method) -> str:
    """'' for a method whose task is one phase (`Method.task_run`: the seeds train each task
    together), else why its seeds run one after another."""
    return "" if method.task_run is not None else WHY_SEQUENTIAL


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

    def run_group(name: str, seeds, run_workdirs, sub_configs, group_dir: str) -> list[dict]:
        del seeds  # each sub_config's seed
        return run_seeds([seq.with_config(c) for c in sub_configs], run_workdirs, name,
                         methods[name], group_dir=group_dir)

    write = functools.partial(report.write_report, os.path.join(workdir, "report"),
                              num_tasks=len(tasks), selection=config.continual.task_selection)
    return comparison.compare(workdir, config, SECTION, run_one, write, harmless=harmless,
                              run_group=run_group,
                              why_sequential=lambda name: why_sequential(methods[name]))


def run_method(seq: TaskSequence, workdir: str, name: str, method: Method) -> dict:
    """Train one method through the task sequence, resuming finished tasks from their orbax
    checkpoints (`workdir/tasks/<t + 1>`: the state after task t); returns its result."""
    return run_seeds([seq], [workdir], name, method)[0]


def run_seeds(seqs: list[TaskSequence], workdirs: list[str], name: str, method: Method, *,
              group_dir: str | None = None) -> list[dict]:
    """`run_method` for several seeds (one sequence, with its seed's config, and workdir each)
    task by task: with `group_dir` and a one-phase method (`Method.task_run`), the seeds that
    have not trained task t yet train it together (`train.seeds.fit_each`; the stacked phase
    checkpoints under `group_dir/task_<t>/`), each then saved, evaluated and written to its own
    workdir exactly as alone; otherwise each seed's task trains in turn."""
    n, t_max = len(seqs), seqs[0].num_tasks
    built = [method.build(seq) for seq in seqs]
    setups = [b[0] for b in built]
    states = [seq.replicate(b[1]) for seq, b in zip(seqs, built)]
    acc = [{k: np.full((t_max, t_max), np.nan) for k in MATRICES} for _ in seqs]
    evals: list[list[TaskEval]] = [[] for _ in seqs]
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(run_lib.metric_writer(w)) for w in workdirs]
        with contextlib.ExitStack() as closing:
            stores = []
            for w in workdirs:
                stores.append(Checkpointer(os.path.join(w, "tasks"), keep=0, async_save=False))
                closing.callback(stores[-1].close)
            for w in writers:
                w.resume_from(-1)  # a rerun evaluates every task again: one record per task
            done = [set(store.all_steps()) for store in stores]
            for t in range(t_max):
                for i, store in enumerate(stores):
                    if t + 1 in done[i]:
                        try:
                            states[i], _ = store.restore(t + 1, states[i])
                        except Exception as e:  # noqa: BLE001 (a truncated or deleted file)
                            done[i] = set_aside_from(store, t + 1, e)
                todo = [i for i in range(n) if t + 1 not in done[i]]
                if todo:
                    log.info("%s: task %d / %d (seeds %s)", name, t + 1, t_max,
                             [seqs[i].config.seed for i in todo])
                    for i, state in zip(todo, train_tasks(seqs, setups, states, todo, t,
                                                          workdirs, name, method, group_dir)):
                        states[i] = seqs[i].replicate(state)
                        stores[i].save(t + 1, states[i], meta={"method": name, "task": t})
                        stores[i].wait()
                for i in range(n):
                    evals[i] = evaluate(seqs[i], method, setups[i], states[i], t)
                    for j, e in enumerate(evals[i]):
                        for k, v in zip(MATRICES, (e.agnostic_acc, e.aware_acc,
                                                   e.selection_acc)):
                            acc[i][k][t, j] = v
                    writers[i].write(t + 1, {f"test/acc_task{j}": e.agnostic_acc
                                             for j, e in enumerate(evals[i])})
        results = []
        for i in range(n):
            summary = {f"test/{k}": v for k, v in summarize_run(acc[i], evals[i]).items()}
            writers[i].write(t_max, summary)
            masks = method.mask_report(jax.device_get(states[i])) if method.mask_report else None
            results.append({**summary, "details": {**{k: v.tolist() for k, v in acc[i].items()},
                                                   "fairness": [e.fairness for e in evals[i]],
                                                   "masks": masks}})
    return results


def train_tasks(seqs, setups, states, todo: list[int], t: int, workdirs, name: str,
                method: Method, group_dir: str | None) -> list:
    """Task t of the seeds `todo` (indices): together where the method's task is one phase and
    a group is asked for, else one after another. Returns their new states."""
    dirs = [os.path.join(workdirs[i], f"task_{t}") for i in todo]
    if group_dir is None or len(todo) < 2 or method.task_run is None:
        return [method.train_task(seqs[i], setups[i], states[i], t, d) for i, d in zip(todo, dirs)]
    built = [method.task_run(seqs[i], setups[i], states[i], t) for i in todo]
    phase_group = os.path.join(group_dir, f"task_{t}",
                               "seeds_" + "-".join(str(seqs[i].config.seed) for i in todo))
    fitted = train_seeds.fit_each([r for r, _ in built], [f"{d}/train" for d in dirs],
                                  phase_group, what=f"continual {name} task {t}")
    return [finish(state) for (_, finish), (state, _) in zip(built, fitted)]


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
