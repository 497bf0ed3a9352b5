"""Checkpoints: orbax CheckpointManager holding the train state, the data iterator's position
and a JSON item (config + loop bookkeeping). All orbax usage lives here, so moving to orbax v1
touches one file.

The best checkpoint (model selection on a validation metric) lives in the same manager: the
loop passes `metrics={"improvement": k, <metric>: value}` when a save sets a new best, and
orbax's preservation policy keeps the checkpoint with the highest `improvement` beside the
latest `keep` ones (`best=True`). Which step that is, is also in every checkpoint's meta
(`loop.best_step`), so a reader needs no policy to find it.

Saves are async (the device->host copy happens before `save` returns, so the state can be
donated right after); `wait()` before reading a checkpoint back or exiting. Only committed
checkpoints are ever listed or restored: a crash mid-save leaves the previous ones intact.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxmed.config_check import UserError


log = logging.getLogger(__name__)


class CheckpointError(RuntimeError, UserError):
    """No checkpoint of a directory can be read back."""


def _improvement(metrics) -> float:
    return float(metrics["improvement"])


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, best: bool = False,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        policies = []
        if keep:
            policies.append(ocp.checkpoint_managers.LatestN(n=keep))
        if best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=_improvement, n=1, keep_checkpoints_without_metrics=False))
        policy = (None if not policies else policies[0] if len(policies) == 1
                  else ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, data_iterator: Any = None,
             meta: dict | None = None, metrics: dict | None = None) -> None:
        """Save (async). `metrics` with an `improvement` key marks a new best (see above)."""
        if int(step) in self.manager.all_steps():
            return  # already saved (a resumed run reaching a step it had checkpointed)
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True,
                          metrics=metrics)

    def restore(self, step: int | None, abstract_state: Any, *, data_iterator: Any = None
                ) -> tuple[Any, dict]:
        """Restore `state` (shaped and sharded like `abstract_state`) and the iterator in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored["state"], dict(restored["meta"] or {})

    def restore_newest_intact(self, abstract_state: Any, *, data_iterator: Any = None
                              ) -> tuple[int | None, Any, dict]:
        """(step, state, meta) of the newest checkpoint that reads back whole; (None, the given
        state, {}) when there is none. An unreadable one (a truncated or deleted file) is moved
        to `<directory>.unreadable/<step>` with a warning naming it and the next older one is
        tried; when every one fails the error names the directory."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                state, meta = self.restore(step, abstract_state, data_iterator=data_iterator)
                return step, state, meta
            except Exception as e:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
                aside = os.path.join(self.directory + ".unreadable", str(step))
                log.warning("checkpoint %s/%d is unreadable (%s: %s); moved to %s, trying the "
                            "one before", self.directory, step, type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "", aside)
                print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                      f"({type(e).__name__}); moved to {aside}", flush=True)
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                if os.path.exists(aside):
                    shutil.rmtree(aside)
                os.replace(os.path.join(self.directory, str(step)), aside)
                self.manager.reload()
        if steps:
            raise CheckpointError(f"no checkpoint in {self.directory} reads back (tried steps "
                                  f"{steps}, now in {self.directory}.unreadable/): delete "
                                  "the workdir's checkpoints/ to start over")
        return None, abstract_state, {}

    def meta(self, step: int | None = None) -> dict:
        """The JSON item (config, loop bookkeeping) of a checkpoint, without the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def best_step(self) -> int | None:
        """The step model selection chose (from the latest checkpoint's bookkeeping), if any
        and still on disk."""
        if self.latest_step() is None:
            return None
        step = self.meta().get("loop", {}).get("best_step")
        return step if step is not None and step in self.all_steps() else None

    def restore_raw(self, step: int | None = None) -> tuple[dict, dict]:
        """The saved state as nested dicts of numpy arrays, readable on any device layout (no
        abstract tree needed), and its meta."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        tree = self.manager.item_metadata(int(step))["state"]
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                              tree)
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        restored = {"state": jax.device_get(restored["state"]), "meta": restored["meta"]}
        return restored["state"], dict(restored["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
