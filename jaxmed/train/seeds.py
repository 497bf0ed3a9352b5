"""The seed axis: the S seeds of one method trained as one compiled program (DESIGN.md).

`fit_seeds(runs, workdirs, group_dir)` takes the S `Run`s a method built for its seeds (each
with its own initialisation, data order and augmentation) and trains them together: their
states stacked on a leading axis, their pure steps (`Run.step`) batched over it and compiled
once, one grain iterator per seed feeding `[S, B, ...]` batches. Each seed keeps its own
bookkeeping: metrics in its own workdir's metrics.jsonl / TensorBoard, evaluation, early
stopping (a seed that stops keeps its best state and is frozen while the others go on), the
NaN guard naming the seed, its final evaluation and, once finished, its final state as the one
checkpoint of its own workdir (where `fit` leaves it). The stacked state, every seed's iterator
position and bookkeeping are checkpointed together in `group_dir/checkpoints/` (resume as
`train_loop`'s, SIGKILL-safe). A parallel run is the same experiment as S sequential runs
(tests/test_seeds.py pins per-seed metrics and params against `fit`).

Mesh: axes ('seed', 'data'); with L devices per process the seed axis has gcd(S, L) devices,
so seeds spread over devices where their count divides (8 seeds on 8 GPUs: one per device, no
gradient all-reduce) and each seed's batch is sharded on 'data' otherwise (across processes
too: every process feeds its rows of every seed's batch).

Batching: `jax.vmap` (with `spmd_axis_name='seed'`) on GPU / TPU and on multi-device meshes.
On a one-device CPU a comparison runs its seeds one after another (`backend_reason`): there
neither batching made one program faster than S runs (XLA:CPU turns a vmapped convolution
into a slow grouped one; an unrolled program compiles S copies while sequential runs share
one compile through main's persistent cache; figures: benchmarks/RESULTS.md, 2026-12-03, the
seed axis). `JAXMED_SEEDS_ON_CPU=unroll` (or `vmap`) forces the one program there;
`fit_seeds` called directly unrolls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmed.train import sharding
from jaxmed.train.checkpoint import Checkpointer
from jaxmed.train.loop import GUARDED, NonFiniteLossError, update_selection
from jaxmed.train.writers import MetricWriter

log = logging.getLogger(__name__)

SEED, DATA = "seed", "data"
BATCHINGS = ("vmap", "unroll")


# ----------------------------------------------------------------------------- placement
def seed_mesh(num_seeds: int, devices: Sequence | None = None) -> Mesh:
    """A ('seed', 'data') mesh over `devices` (default: all), gcd(num_seeds, devices per
    process) devices on 'seed', each process's devices covering every seed group (so that
    'data' is the axis that spans processes, as every process feeds rows of every seed)."""
    devices = list(jax.devices() if devices is None else devices)
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    groups = [sorted(v, key=lambda d: d.id) for _, v in sorted(by_process.items())]
    per = len(groups[0])
    if any(len(g) != per for g in groups):
        raise ValueError(f"processes hold different device counts {[len(g) for g in groups]}")
    k = math.gcd(int(num_seeds), per)
    grid = np.concatenate([np.asarray(g, dtype=object).reshape(k, per // k) for g in groups],
                          axis=1)
    return Mesh(grid, (SEED, DATA))


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (seed) axis on 'seed', the rest replicated within each seed group."""
    return NamedSharding(mesh, P(SEED))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[S, B, ...]: seeds on 'seed', each seed's rows on 'data'."""
    return NamedSharding(mesh, P(SEED, DATA))


def stack(trees: Sequence[Any]) -> Any:
    """Host pytrees of one structure -> one pytree of numpy arrays with a leading seed axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def take(tree: Any, i: int) -> Any:
    """Seed `i` of a stacked pytree (host or device)."""
    return jax.tree.map(lambda x: x[i], tree)


def place_stacked(host_tree: Any, mesh: Mesh) -> Any:
    """A host pytree with a leading seed axis (identical on every process) on the mesh."""
    sh = stacked_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sh, np.asarray(x), np.shape(x)), host_tree)


def batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Host-local [S, B_local, ...] numpy batches -> global [S, B, ...] arrays."""
    sh = batch_sharding(mesh)
    n = jax.process_count()

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sh, x, (x.shape[0], x.shape[1] * n, *x.shape[2:]))
    return jax.tree.map(put, batch)


# ------------------------------------------------------------------------------- the step
def cannot_stack(runs: Sequence[Any]) -> str:
    """Why these runs cannot train as one program ('' when they can)."""
    r0 = runs[0]
    if any(r.step is None for r in runs):
        return "its training step is not given as a pure function (Run.step)"
    if any(r.state_hooks for r in runs):
        return ("it acts on each seed's state between steps (state hooks: pruning schedules, "
                "HTL's identification)")
    def spec(x):  # (no host copy of a device array)
        return np.shape(x), np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype).str

    shapes = [jax.tree.map(spec, r.state) for r in runs]
    if any(jax.tree.structure(s) != jax.tree.structure(shapes[0]) or s != shapes[0]
           for s in shapes):
        return "its seeds' states differ in structure or shape"
    for what in ("settings", "durations", "global_batch", "eval_splits", "final_split"):
        if any(getattr(r, what) != getattr(r0, what) for r in runs):
            return f"its seeds' runs differ in {what}"
    if any(len(r.step_args) != len(r0.step_args) for r in runs):
        return "its seeds' steps take different arguments"
    return ""


def _where(active, new, old):
    a = active.reshape(active.shape + (1,) * (new.ndim - 1))
    return jnp.where(a, new, old)


def group_step(step: Callable, num_seeds: int, shared: Sequence[bool], batching: str
               ) -> Callable:
    """(stacked, batch, active, *args) -> (stacked, metrics [S]) running `step(state, batch,
    *args)` for every seed; args flagged `shared` are the same for every seed (not stacked).
    A seed with active False keeps its state bitwise (an early-stopped seed is frozen)."""
    if batching not in BATCHINGS:
        raise ValueError(f"batching {batching!r}: one of {BATCHINGS}")
    if batching == "vmap":
        in_axes = (0, 0, *[None if s else 0 for s in shared])
        many = jax.vmap(step, in_axes=in_axes, spmd_axis_name=SEED)
    else:
        def many(state, batch, *args):
            outs = [step(take(state, i), take(batch, i),
                         *[a if s else take(a, i) for a, s in zip(args, shared)])
                    for i in range(num_seeds)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    def fn(stacked, batch, active, *args):
        chex.assert_shape(active, (num_seeds,))
        new, metrics = many(stacked, batch, *args)
        return jax.tree.map(lambda n, o: _where(active, n, o), new, stacked), metrics

    return fn


def jit_group_step(fn: Callable, mesh: Mesh, shared: Sequence[bool]) -> Callable:
    """jit the group step: stacked state on 'seed' (donated), batch on ('seed', 'data'),
    per-seed args on 'seed', shared ones and `active` replicated."""
    st, rep = stacked_sharding(mesh), sharding.replicated(mesh)
    args = tuple(rep if s else st for s in shared)
    return jax.jit(fn, in_shardings=(st, batch_sharding(mesh), rep, *args),
                   out_shardings=(st, st), donate_argnums=0)


def _select(best, state, improved):
    return jax.tree.map(lambda s, b: _where(improved, s, b), state, best)


ON_CPU = "JAXMED_SEEDS_ON_CPU"


def default_batching(mesh: Mesh) -> str:
    """'vmap', or on a one-device CPU '' (seeds one after another: there one program of S
    seeds measured slower than S runs, see the module docstring) unless the environment
    variable JAXMED_SEEDS_ON_CPU names a batching ('unroll', 'vmap': what
    benchmarks/comparison.py times)."""
    if jax.default_backend() == "cpu" and mesh.devices.size == 1:
        how = os.environ.get(ON_CPU, "")
        if how and how not in BATCHINGS:
            raise ValueError(f"{ON_CPU}={how!r}: one of {BATCHINGS} or unset")
        return how
    return "vmap"


# ---------------------------------------------------------------------------- the streams
class SeedIterators:
    """The seeds' grain iterators as one checkpointable item: `next` stacks their batches;
    the state is every iterator's state (grain's checkpoint handler stores it as JSON)."""

    def __init__(self, iterators: Sequence[Any]):
        self.iterators = list(iterators)

    def __next__(self) -> dict:
        return stack([next(it) for it in self.iterators])

    def get_state(self) -> bytes:
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state)
        if len(states) != len(self.iterators):
            raise ValueError(f"a checkpoint of {len(states)} seeds' iterators restored into "
                             f"{len(self.iterators)}")
        for it, s in zip(self.iterators, states):
            it.set_state(s)

    def start_prefetch(self) -> None:
        for it in self.iterators:
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


# ------------------------------------------------------------------------------- the loop
def _fresh_book() -> dict:
    return {"best_value": None, "best_step": None, "bad_evals": 0, "stopped_early": False,
            "last_eval_step": None, "improvements": 0, "last_step": None}


def fit_seeds(runs: Sequence[Any], workdirs: Sequence[str], group_dir: str, *,
              batching: str | None = None) -> list[tuple[Any, dict]]:
    """Train `runs` (one per seed, `cannot_stack(runs)` empty) together; returns each seed's
    (final state on its run's mesh, final split's metrics), as `fit` would for it alone."""
    reason = cannot_stack(runs)
    if reason:
        raise ValueError(f"these runs cannot train as one program: {reason}")
    r0, num = runs[0], len(runs)
    settings = r0.settings
    mesh = seed_mesh(num)
    batching = batching or default_batching(mesh) or "unroll"
    shared = [all(r.step_args[j] is r0.step_args[j] for r in runs)
              for j in range(len(r0.step_args))]
    args = [sharding.replicate(jax.device_get(r0.step_args[j]), mesh) if s else
            place_stacked(stack([jax.device_get(r.step_args[j]) for r in runs]), mesh)
            for j, s in enumerate(shared)]
    step_fn = jit_group_step(group_step(r0.step, num, shared, batching), mesh, shared)
    select = jax.jit(_select, donate_argnums=0)
    selecting = bool(settings.early_stop_metric)
    host = stack([sharding.to_host(r.state) for r in runs])
    carry = {"state": place_stacked(host, mesh)}
    if selecting:
        carry["best"] = place_stacked(host, mesh)
    del host
    streams = [r.make_stream() for r in runs]
    spe, epochs = streams[0].steps_per_epoch, streams[0].num_epochs
    total = min(settings.steps if settings.steps > 0 else settings.epochs * spe, epochs * spe)
    its = SeedIterators([s.iterator for s in streams])
    ckpt = Checkpointer(os.path.join(group_dir, "checkpoints"), keep=settings.keep_checkpoints)
    books = [_fresh_book() for _ in runs]
    latest, carry, saved = ckpt.restore_newest_intact(carry, data_iterator=its)
    if latest is not None:
        books = saved["loop"]["seeds"]
        print(f"resuming {num} seeds from checkpoint step {latest} in {ckpt.directory}",
              flush=True)
    step = int(latest or 0)
    eval_every = settings.eval_every if settings.eval_every != 0 else spe
    ckpt_every = settings.checkpoint_every if settings.checkpoint_every > 0 else spe
    meta = {**r0.meta, "seeds": [{k: v for k, v in r.meta.items() if k != "config"}
                                  for r in runs]}
    writers = [MetricWriter(w, enabled=sharding.is_lead_process()) for w in workdirs]
    print(f"{num} seeds as one program ({batching}) on mesh {dict(mesh.shape)}; "
          f"{jax.process_count()} process(es)", flush=True)
    pending: list[tuple[int, Any]] = []
    last_log = (time.time(), step)

    def active() -> np.ndarray:
        return np.asarray([not b["stopped_early"] for b in books])

    def flush():
        nonlocal pending, last_log
        if not pending:
            return
        fetched = sharding.to_host([m for _, m in pending])
        now = time.time()
        for i, b in enumerate(books):
            rows = [(s, {k: v[i] for k, v in m.items()}) for (s, _), m in zip(pending, fetched)
                    if b["last_step"] is None or s <= b["last_step"]]
            for s, m in rows:
                for k in GUARDED:
                    if k in m and not np.isfinite(m[k]):
                        ckpt.wait()
                        raise NonFiniteLossError(
                            f"seed {runs[i].meta.get('seed', i)} ({workdirs[i]}): train/{k} "
                            f"is {float(m[k])} at step {s}: runs stopped. Last good checkpoint"
                            f" of the seeds: step {ckpt.latest_step()} in {ckpt.directory}; "
                            "parallel_seeds=False trains the other seeds on their own")
            if rows:
                means = {f"train/{k}": float(np.mean([m[k] for _, m in rows]))
                         for k in rows[0][1]}
                means["train/images_per_sec"] = r0.global_batch * (step - last_log[1]) / max(
                    now - last_log[0], 1e-9)
                writers[i].write(rows[-1][0], means)
        pending, last_log = [], (now, step)

    def evaluate(state, splits) -> list[dict]:
        host = sharding.to_host(state)
        out = []
        for i, r in enumerate(runs):
            if books[i]["stopped_early"]:
                out.append({})
                continue
            st = sharding.replicate(take(host, i), r.mesh)
            res = {}
            for split in splits:
                res.update({f"{split}/{k}": v for k, v in r.evaluate(st, split).items()})
            out.append(res)
        return out

    def save():
        flush()
        ckpt.save(step, carry, data_iterator=its, meta={**meta, "loop": {"seeds": books}})

    try:
        for w in writers:
            w.resume_from(step if latest is not None else -1)
        while step < total and active().any():
            batch = batch_to_global(next(its), mesh)
            carry["state"], metrics = step_fn(carry["state"], batch, active(), *args)
            step += 1
            pending.append((step, metrics))
            if step % settings.log_every == 0:
                flush()
            if (eval_every > 0 and step % eval_every == 0) or step == total:
                flush()
                improved = _select_and_stop(evaluate(carry["state"], r0.eval_splits), step,
                                            books, writers, settings, total)
                if selecting and improved.any():
                    carry["best"] = select(carry["best"], carry["state"], improved)
            if step % ckpt_every == 0 or step == total or not active().any():
                save()
        flush()
        if ckpt.latest_step() != step:
            save()
        ckpt.wait()
        # every seed is evaluated at its last step at least, and a first evaluation always
        # improves: with selection each seed's best state is set
        host = sharding.to_host(carry["best"] if selecting else carry["state"])
        results = []
        for i, r in enumerate(runs):
            st = sharding.replicate(take(host, i), r.mesh)
            final = r.evaluate(st, r.final_split) if r.final_split else {}
            if final:
                writers[i].write(books[i]["last_step"] or step,
                                 {f"{r.final_split}/{k}": v for k, v in final.items()})
            results.append((st, final))
            _save_own(workdirs[i], st, {**r.meta, "loop": books[i]},
                      None if selecting else its.iterators[i])
    except BaseException:
        ckpt.close()
        for w in writers:
            w.close()
        raise
    ckpt.close()
    for w in writers:
        w.close()
    return results


def _save_own(workdir: str, state, meta: dict, data_iterator=None) -> None:
    """The seed's final (selected) state as the one checkpoint of its own workdir, as a
    sequential run's best / last one: what reads a finished run (PruneCXR's sweeps, a
    FoPro-KD teacher, a user) finds it where `fit` would have left it. Without model selection
    the state is the last one and its iterator is saved too, so that `fit` on that workdir
    (a continual phase retried alone after a crash) finds the run finished, not unreadable."""
    path = os.path.join(workdir, "checkpoints")
    if os.path.isdir(path) and sharding.is_lead_process():  # an earlier, sequential attempt's
        aside = path + ".sequential_attempt"
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.replace(path, aside)
    sharding.barrier("jaxmed_seed_checkpoint")
    ck = Checkpointer(path, keep=1)
    try:
        ck.save(int(jax.device_get(state.step)), state, data_iterator=data_iterator, meta=meta)
    finally:
        ck.close()


def _select_and_stop(results: list[dict], step: int, books: list[dict], writers, settings,
                     total: int) -> np.ndarray:
    """Each active seed's evaluation: written, its selection and early stopping updated.
    Returns which seeds improved (their best state is to be replaced by the current one)."""
    improved = np.zeros(len(books), bool)
    for i, (res, b) in enumerate(zip(results, books)):
        if b["stopped_early"]:
            continue
        writers[i].write(step, res)
        b["last_eval_step"] = step
        if step == total:
            b["last_step"] = step
        outcome = update_selection(b, res, step, settings)
        improved[i] = outcome == "improved"
        if outcome == "stop":
            b["last_step"] = step
    return improved


def backend_reason(parallel: bool, num_seeds: int) -> str:
    """Why `num_seeds` seeds would not train as one program here, before any is built ('' when
    they would): parallel_seeds off, one seed, or a one-device CPU (see `default_batching`).
    Callers that get a reason train their seeds one after another the usual way, each built
    and finished (result.json) before the next."""
    if not parallel:
        return "parallel_seeds is False"
    if num_seeds < 2:
        return "one seed"
    if not default_batching(seed_mesh(num_seeds)):
        return (f"one CPU device, where S seeds as one program measured slower than S runs "
                f"(benchmarks/RESULTS.md; {ON_CPU}=unroll forces it)")
    return ""


def fit_each(runs: Sequence[Any], workdirs: Sequence[str], group_dir: str, *,
             what: str = "") -> list[tuple[Any, dict]]:
    """`fit_seeds` when the (built) runs can stack, else `fit` one after another with a log
    line saying why. Callers check `backend_reason` first."""
    from jaxmed.train.run import fit

    reason = cannot_stack(runs) if len(runs) > 1 else ""
    if len(runs) > 1 and not reason:
        return fit_seeds(runs, workdirs, group_dir)
    if len(runs) > 1:
        say_sequential(what or group_dir, len(runs), reason)
    return [fit(r, w) for r, w in zip(runs, workdirs)]


def say_sequential(what: str, num_seeds: int, reason: str) -> None:
    """The log line of seeds that train one after another."""
    log.info("%s: %d seeds one after another: %s", what, num_seeds, reason)
    print(f"{what}: {num_seeds} seeds one after another ({reason})", flush=True)
