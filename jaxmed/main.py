"""jaxmed's entry point: `jaxmed --config=configs/x.py[:arg] --workdir=DIR [--config.k=v ...]`.

Dispatches on `config.method` to `jaxmed.methods.<method>.train_and_evaluate`. Before anything
runs, the config is checked against the method's `default_config()`: an unknown or misspelt key
fails with the key named. Several processes (SLURM, TPU pods, `launch/multiprocess_local.sh`)
join through `jax.distributed.initialize()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxmed import methods
from jaxmed.config_check import ConfigKeyError, UserError, check_keys, check_values

METHODS = methods.REGISTRY

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py or file.py:arg).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir whose config differs in keys that change results; the "
                  "change is recorded in workdir/config_history.jsonl.")
flags.DEFINE_string("coordinator_address", os.environ.get("JAXMED_COORDINATOR", ""),
                    "host:port of process 0, to join several processes by hand.")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAXMED_NUM_PROCESSES", "1")),
                     "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", int(os.environ.get("JAXMED_PROCESS_ID", "0")),
                     "This process's index (with --coordinator_address).")


def method_module(config):
    try:
        return methods.load(config.get("method"))
    except KeyError as e:
        raise ConfigKeyError(e.args[0]) from None


def validate(config):
    """Check every key against the method's default config and every value that no run can
    use; returns the method module."""
    module = method_module(config)
    check_keys(config, module.default_config())
    check_values(config)
    try:  # the data's and the method's own checks (tuples, ranges...)
        from jaxmed import data as data_lib

        data_lib.check_config(config.data)
        module.check_config(config)
    except ValueError as e:
        raise ConfigKeyError(str(e)) from None
    return module


def parse_flags(argv):
    """absl's flag parsing, with a bad `--config.*` override reported like a bad key in a
    config file: one line, exit 2 (not a traceback)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        given = [a.split("=")[0][len("--config."):] for a in argv[1:]
                 if a.startswith("--config.")]
        name = str(e).strip("\"'")
        bad = [k for k in given if name in k.split(".")]
        what = (f"unknown config key {bad[0]!r} (--config.{bad[0]} on the command line)" if bad
                else f"{e} (command-line overrides: {', '.join(given) or 'none'})")
        print(f"config error: {what}", file=sys.stderr)
        sys.exit(2)


def initialize_distributed() -> None:
    """Join the other processes if this run has several (no-op for a single process)."""
    import jax

    if FLAGS.coordinator_address or FLAGS.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ \
            and "," in os.environ["TPU_WORKER_HOSTNAMES"]:
        jax.distributed.initialize()  # cluster auto-detection (SLURM, Cloud TPU)


def main(argv) -> None:
    del argv
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger("jaxmed").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / grain chatter
    from jaxmed.train import workdir as workdir_lib

    try:
        module = validate(FLAGS.config)
        harmless = tuple(module.HARMLESS_KEYS)
        workdir_lib.check_config(FLAGS.config, FLAGS.workdir,
                                 allow_changed=FLAGS.allow_config_change, harmless=harmless)
    except (ConfigKeyError, workdir_lib.ConfigChangedError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    initialize_distributed()
    import jax

    if jax.default_backend() == "cpu":
        # XLA:CPU compiles the partitionable threefry PRNG slowly (2x longer model inits).
        jax.config.update("jax_threefry_partitionable", False)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Programs compiled once per workdir: a resumed run, or the several models of one
        # study (PruneCXR runs, continual baselines), reuse them.
        jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    with contextlib.ExitStack() as held:
        hold_workdir(held, FLAGS.workdir)
        if FLAGS.allow_config_change:
            workdir_lib.write_config(FLAGS.config, FLAGS.workdir, allow_changed=True,
                                     harmless=harmless)
        try:
            result = module.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except (UserError, FileNotFoundError) as e:  # a bad data file, value or workdir found
            # once the run started: the message names it
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    if jax.process_index() == 0:
        print("final:", {k: round(v, 4) if isinstance(v, float) else v
                         for k, v in (result or {}).items()}, flush=True)


def hold_workdir(stack: contextlib.ExitStack, workdir: str) -> None:
    """Process 0 takes the workdir lock for the run; every process learns whether it got it
    (so none of them waits forever in a collective when another run holds the workdir)."""
    import jax
    import numpy as np

    from jaxmed.train import workdir as workdir_lib

    held_by_other = ""
    if jax.process_index() == 0:
        try:
            stack.enter_context(workdir_lib.lock(workdir))
        except workdir_lib.WorkdirLockedError as e:
            held_by_other = str(e)
    free = not held_by_other
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        free = bool(multihost_utils.broadcast_one_to_all(np.int32(free)))
    if not free:
        print(f"error: {held_by_other or workdir + ' is in use by another run'}",
              file=sys.stderr)
        sys.exit(3)


def run() -> None:
    """Console script `jaxmed`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
