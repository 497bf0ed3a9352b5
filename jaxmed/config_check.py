"""Config validation: a config may only hold keys its method reads (locked ConfigDicts catch
command-line typos; this catches typos written in config files)."""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections


class UserError(Exception):
    """A fault in what the user gave (a config value, a data file, a workdir) whose message
    names it: `jaxmed` prints the message in one line and exits 2 instead of a traceback."""


class InputError(ValueError, UserError):
    """A data file, workdir file or value that cannot be used, found once a run started."""


class ConfigKeyError(KeyError, UserError):
    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0])


def check_keys(config, reference, prefix: str = "") -> None:
    """Raise ConfigKeyError naming the first key of `config` that `reference` lacks."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]!r}?)" if close else ""
            raise ConfigKeyError(f"unknown config key {name!r}{hint}")
        value, ref = config[key], reference[key]
        if isinstance(ref, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigKeyError(f"config key {name!r} must be a group of keys, got {value!r}")
            check_keys(value, ref, prefix=f"{name}.")


def _leaves(config, prefix: str = ""):
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", key, value


def check_values(config) -> None:
    """Refuse values no run can use, naming the key, before anything is built: batch sizes
    must be positive, epochs / steps non-negative with something to train, learning rates
    positive, early stopping 'min' or 'max'."""
    for name, key, value in _leaves(config):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if key == "early_stop_mode" and value not in ("min", "max"):
                raise ConfigKeyError(f"config.{name}={value!r}: use 'min' or 'max'")
            continue
        if key.endswith("batch_size") and (value <= 0 or value != int(value)):
            raise ConfigKeyError(f"config.{name}={value!r}: a batch size must be a positive "
                                 "integer")
        if (key.endswith("epochs") or key in ("steps", "patience", "keep_checkpoints")) \
                and value < 0:
            raise ConfigKeyError(f"config.{name}={value!r} must be >= 0")
        if key in ("lr", "learning_rate") and value <= 0:
            raise ConfigKeyError(f"config.{name}={value!r}: the learning rate must be > 0")
    train = config.get("train")
    if train is not None and "epochs" in train and "steps" in train \
            and train.epochs == 0 and train.steps == 0:
        raise ConfigKeyError("config.train.epochs=0 and config.train.steps=0: nothing to "
                             "train; set one of them")


def sibling(config_file: str, name: str = "common"):
    """The module `name`.py beside a config file, loaded by path: config files are loaded by
    path too (`--config=configs/x/quick.py`), so `configs/` need not be a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(
        f"jaxmed_config_{os.path.basename(os.path.dirname(path))}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
