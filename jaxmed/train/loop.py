"""The training loop every method shares: steps, logging, evaluation cadence, early stopping,
checkpoints with resume, and the NaN guard. Step functions stay pure; this file holds the
side effects.

Guarantees:
  - resume: if `workdir/checkpoints/` holds a checkpoint, the state, the data iterator's position
    and the loop's bookkeeping are restored and training continues from there (bitwise the same
    as an uninterrupted run on the same hardware);
  - NaN guard: train metrics are fetched before every checkpoint and every `log_every` steps; a
    non-finite loss or gradient norm stops the run with the first bad step named, and no
    checkpoint is ever written after it, so the last one stays good;
  - the final evaluation is on the test split (with the best checkpoint when early stopping
    selects one).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm import tqdm

from jaxmed.train import sharding
from jaxmed.train.checkpoint import Checkpointer
from jaxmed.train.writers import MetricWriter

log = logging.getLogger(__name__)

GUARDED = ("loss", "grad_norm", "param_norm")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN / Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class LoopSettings:
    """The loop's part of `config.train` (see methods/supervised.py for the keys)."""

    epochs: int
    steps: int = 0  # if > 0, stop after this many steps (overrides epochs)
    log_every: int = 50
    eval_every: int = 0  # steps; 0 = once per epoch; < 0 = never before the end
    checkpoint_every: int = 0  # steps; 0 = once per epoch
    keep_checkpoints: int = 3
    early_stop_metric: str = ""  # e.g. 'val/loss'; empty = no model selection
    early_stop_mode: str = "min"
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop
    progress: bool = True

    @classmethod
    def from_config(cls, train_cfg) -> "LoopSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: train_cfg[k] for k in names if k in train_cfg})


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a < b if mode == "min" else a > b)


def train_loop(*, workdir: str, settings: LoopSettings, state: Any, train_step: Callable,
               make_stream: Callable[[], Any], evaluate: Callable[[Any, str], dict],
               mesh, writer: MetricWriter, meta: dict | None = None,
               hooks: Iterable[Callable[[int, Any], None]] = (),
               state_hooks: Iterable[Callable[[int, Any], Any]] = (),
               eval_splits: tuple[str, ...] = ("val",), final_split: str = "test",
               global_batch: int = 0) -> tuple[Any, dict]:
    """Run (or resume) training; returns the final state and the final split's metrics.

    train_step(state, global_batch) -> (state, {name: scalar}); evaluate(state, split) -> metrics
    dict without the split prefix; make_stream() -> a fresh `TrainStream`. state_hooks(step,
    state) -> state run with step = completed steps: at 0 before a fresh run's first step, then
    after every step (pruning schedules: an event 'at step s' acts before training step s + 1);
    hooks(step, state) observe only."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=settings.keep_checkpoints,
                        best=bool(settings.early_stop_metric))
    stream = make_stream()
    spe = stream.steps_per_epoch
    total = min(settings.steps if settings.steps > 0 else settings.epochs * spe,
                stream.num_epochs * spe)
    book = {"best_value": None, "best_step": None, "bad_evals": 0, "stopped_early": False,
            "last_eval_step": None, "improvements": 0}
    latest, state, saved = ckpt.restore_newest_intact(state, data_iterator=stream.iterator)
    if latest is not None:
        book.update(saved.get("loop", {}))
        log.info("resumed from %s at step %d", ckpt.directory, latest)
        print(f"resuming from checkpoint step {latest} in {ckpt.directory}", flush=True)
    step = int(jax.device_get(state.step))
    writer.resume_from(step if latest is not None else -1)
    eval_every = settings.eval_every if settings.eval_every != 0 else spe
    ckpt_every = settings.checkpoint_every if settings.checkpoint_every > 0 else spe
    meta = dict(meta or {})

    pending: list[tuple[int, dict]] = []
    last_log = (time.time(), step)
    bar = tqdm(total=total, initial=step, disable=not (settings.progress
                                                        and sharding.is_lead_process()),
               unit="step", dynamic_ncols=True, mininterval=2.0)

    def flush():
        """Fetch pending train metrics, stop on a non-finite value, log means and images/s."""
        nonlocal pending, last_log
        if not pending:
            return
        fetched = sharding.to_host([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            for k in GUARDED:
                if k in m and not np.isfinite(m[k]):
                    ckpt.wait()
                    good = ckpt.latest_step()
                    raise NonFiniteLossError(
                        f"train/{k} is {float(m[k])} at step {s}: run stopped. Last good "
                        f"checkpoint: step {good} in {ckpt.directory}")
        now = time.time()
        means = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        if global_batch:
            means["train/images_per_sec"] = global_batch * (step - last_log[1]) / max(
                now - last_log[0], 1e-9)
        writer.write(step, means)
        bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in means.items()}, refresh=False)
        pending, last_log = [], (now, step)

    def save(metrics=None):
        flush()
        ckpt.save(step, state, data_iterator=stream.iterator, meta={**meta, "loop": book},
                  metrics=metrics)

    try:
        if step == 0:  # (a resumed state already holds the hooks' effects up to its step)
            for transform in state_hooks:
                state = transform(0, state)
        stop = bool(book["stopped_early"])
        first = True
        while step < total and not stop:
            batch = next(stream)
            if first:  # what this process feeds (multi-host runs: its own share of every batch)
                rows = len(jax.tree.leaves(batch)[0])
                print(f"process {jax.process_index()}/{jax.process_count()}: "
                      f"{jax.local_device_count()} of {jax.device_count()} devices, {rows} rows of "
                      f"each global batch of {global_batch or '?'}", flush=True)
                first = False
            state, metrics = train_step(state, sharding.to_global(batch, mesh))
            step += 1
            bar.update(1)
            pending.append((step, metrics))
            for transform in state_hooks:
                state = transform(step, state)
            if step % settings.log_every == 0:
                flush()
            best = None
            if (eval_every > 0 and step % eval_every == 0) or step == total:
                flush()
                stop, best = _evaluate_and_select(state, step, evaluate, eval_splits, writer,
                                                  settings, book)
            if best is not None or step % ckpt_every == 0 or stop or step == total:
                save(best)
            for hook in hooks:
                hook(step, state)
        flush()
        bar.close()
        if ckpt.latest_step() != step:
            save()
        ckpt.wait()
        if settings.early_stop_metric and book["best_step"] is not None:
            state, _ = ckpt.restore(book["best_step"], state)
            log.info("final evaluation with the best checkpoint (step %s)", book["best_step"])
        final = {}
        if final_split:
            final = evaluate(state, final_split)
            writer.write(step, {f"{final_split}/{k}": v for k, v in final.items()})
    except BaseException:
        # a bad batch, a NaN, a kill signal: let the save in flight commit first, so the
        # rerun resumes from it instead of an older step (or step 0)
        ckpt.close()
        raise
    ckpt.close()
    return state, final


def _evaluate_and_select(state, step, evaluate, splits, writer, settings, book
                         ) -> tuple[bool, dict | None]:
    """Evaluate on each split and update the bookkeeping. Returns (early stopping triggers,
    the checkpoint metrics marking this step as the new best, or None)."""
    results = {}
    for split in splits:
        results.update({f"{split}/{k}": v for k, v in evaluate(state, split).items()})
    writer.write(step, results)
    book["last_eval_step"] = step
    outcome = update_selection(book, results, step, settings)
    if outcome == "improved":
        key = settings.early_stop_metric
        return False, {"improvement": book["improvements"], key: float(results[key])}
    return outcome == "stop", None


def update_selection(book: dict, results: dict, step: int, settings: LoopSettings) -> str:
    """Model selection and early stopping of one run's bookkeeping after an evaluation:
    'improved' (a new best at `step`), 'stop' (patience exhausted) or ''. The seed axis
    (train.seeds) keeps one such book per seed."""
    key = settings.early_stop_metric
    if not key:
        return ""
    if key not in results:
        raise KeyError(f"early_stop_metric {key!r} is not among the evaluation metrics "
                       f"{sorted(results)}")
    value = float(results[key])
    if _better(value, book["best_value"], settings.early_stop_mode):
        book.update(best_value=value, best_step=step, bad_evals=0,
                    improvements=book.get("improvements", 0) + 1)
        return "improved"
    book["bad_evals"] += 1
    if settings.patience and book["bad_evals"] >= settings.patience:
        book["stopped_early"] = True
        log.info("early stop at step %d: %s did not improve for %d evaluations", step, key,
                 settings.patience)
        return "stop"
    return ""
