"""The task sequence of a continual run: class groups of one dataset (`continual.tasks`), or one
reference split file per task (`continual.task_split_files`, tasks sharing class names share
class ids). Every record of a task carries its within-task label and `attrs['task']`."""

from __future__ import annotations

import copy
import dataclasses

from jaxmed import data as data_lib
from jaxmed.data.sources import TaskSource, split_by_class_groups


@dataclasses.dataclass
class Task:
    id: int
    class_ids: list[int]  # global class ids of its within-task labels 0..C_t-1
    class_names: list[str]
    splits: dict[str, TaskSource]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


def split_files(cc) -> list[str]:
    return [f.strip() for f in cc.task_split_files if f.strip()]


def build_tasks(config) -> tuple[list[Task], data_lib.DatasetInfo]:
    cc = config.continual
    files = split_files(cc)
    if files:
        tasks, names = [], []
        info = None
        for t, path in enumerate(files):
            dcfg = copy.deepcopy(config.data)
            dcfg.split_file = path
            ds = data_lib.build(dcfg)
            info = ds.info
            ids = []
            for n in ds.info.class_names:  # tasks sharing class names share class ids
                if n not in names:
                    names.append(n)
                ids.append(names.index(n))
            lm = {c: c for c in range(ds.info.num_classes)}
            tasks.append(Task(t, ids, ds.info.class_names,
                              {s: TaskSource(ds[s], t, lm) for s in ds.splits}))
        return tasks, info
    ds = data_lib.build(config.data)
    if ds.info.multi_label:
        raise ValueError("continual tasks by class groups need single-label data")
    groups = [[int(c) for c in g] for g in cc.tasks]
    bad = [c for g in groups for c in g if not 0 <= c < ds.info.num_classes]
    if bad or not groups:
        raise ValueError(f"config.continual.tasks={cc.tasks!r} names classes {bad} outside the "
                         f"dataset's {ds.info.num_classes} classes (or no task)")
    per_split = {s: split_by_class_groups(ds[s], groups) for s in ds.splits}
    tasks = []
    for t, g in enumerate(groups):
        lm = {c: i for i, c in enumerate(g)}
        tasks.append(Task(t, g, [ds.info.class_names[c] for c in g],
                          {s: TaskSource(per_split[s][t], t, lm) for s in ds.splits}))
    return tasks, ds.info
