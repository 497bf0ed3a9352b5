"""Re-evaluate finished runs of a BiasPruner comparison: task-agnostic accuracy and task
selection on the bias-aligned vs the bias-conflicting test images of every task.

    python benchmarks/biaspruner_selection.py WORKDIR [METHOD ...]

WORKDIR: a `jaxmed --config=configs/biaspruner/<x>.py` workdir (its config.json and
runs/<method>/seed_<s>/tasks/<T>: the state after the last task)."""

import json
import os
import sys

import ml_collections

from jaxmed.methods import biaspruner
from jaxmed.methods.biaspruner import frame
from jaxmed.methods.biaspruner.tasks import build_tasks
from jaxmed.train import comparison
from jaxmed.train.checkpoint import Checkpointer


def main(workdir: str, methods: list[str]) -> None:
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    sb = config.data.get("synthetic_bias")
    if sb is not None and "task_background" not in sb:  # workdirs written before the knob
        sb.task_background = True
    if "task_selection" not in config.continual:  # ... and before task selection by BN
        config.continual.task_selection = "entropy"
    tasks, info = build_tasks(config)
    for m in methods or list(config.continual.methods):
        for seed in config.continual.seeds:
            cfg = ml_collections.ConfigDict(config.to_dict())
            cfg.seed = int(seed)
            seq = frame.TaskSequence(cfg, tasks, info)
            method = biaspruner.METHODS[m]
            setup, state = method.build(seq)
            store = Checkpointer(os.path.join(comparison.run_dir(workdir, m, seed), "tasks"),
                                 keep=0, async_save=False)
            state, _ = store.restore(len(tasks), seq.replicate(state))
            store.close()
            evals = frame.evaluate(seq, method, setup, state, len(tasks) - 1)
            cells = [" ".join(f"{k}={e.groups[k]:.2f}" for k in (
                "acc_aligned", "acc_conflicting", "selection_aligned", "selection_conflicting"))
                for e in evals]
            print(f"{m} seed {seed}: " + " | ".join(f"task {t}: {c}" for t, c in
                                                    enumerate(cells)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
