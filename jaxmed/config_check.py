"""Config validation: a config may only hold keys its method reads (locked ConfigDicts catch
command-line typos; this catches typos written in config files)."""

from __future__ import annotations

import difflib

import ml_collections


class ConfigKeyError(KeyError):
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
