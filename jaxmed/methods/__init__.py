"""The methods and the contract each one keeps.

A method is a module (a package's `__init__.py`) with `default_config()` (every key it reads),
`check_config(config)` (ValueError naming the key at fault, before anything runs),
`HARMLESS_KEYS` (keys that may change when a workdir resumes: they never change results) and
`train_and_evaluate(config, workdir) -> dict`; its `__all__` lists them. `load(name)` imports a
registered method and checks the contract, as jaxpruner's `ALGORITHM_REGISTRY` declares its
algorithms instead of probing them.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

REGISTRY = {
    "supervised": "jaxmed.methods.supervised",
    "prunecxr": "jaxmed.methods.prunecxr",
    "biaspruner": "jaxmed.methods.biaspruner",
    "tear": "jaxmed.methods.tear",
    "fopro_kd": "jaxmed.methods.fopro_kd",
    "htl": "jaxmed.methods.htl",
}
CONTRACT = ("default_config", "check_config", "HARMLESS_KEYS", "train_and_evaluate")


@runtime_checkable
class Method(Protocol):
    HARMLESS_KEYS: tuple[str, ...]

    def default_config(self): ...

    def check_config(self, config) -> None: ...

    def train_and_evaluate(self, config, workdir: str) -> dict: ...


def load(name: str) -> Method:
    """The registered method `name`; KeyError naming the known ones, TypeError naming what a
    module lacks of the contract."""
    if name not in REGISTRY:
        raise KeyError(f"config.method={name!r} is not a jaxmed method; known: "
                       f"{sorted(REGISTRY)}")
    module = importlib.import_module(REGISTRY[name])
    missing = [k for k in CONTRACT if not hasattr(module, k)
               or k not in getattr(module, "__all__", ())]
    if missing or not isinstance(module, Method):
        raise TypeError(f"{REGISTRY[name]} does not keep the method contract: {missing} "
                        "missing from the module or its __all__")
    return module


__all__ = ["CONTRACT", "REGISTRY", "Method", "load"]
