"""Hyper-parameter records built from a config section by field name, so that a method's
frozen dataclass of static values never copies 15-25 keys one by one."""

from __future__ import annotations

import dataclasses


class FromConfig:
    """Mixin for a (frozen) dataclass: `from_config(section, **computed)` takes each field
    named as a key of the config section from it and the rest from `computed` (values a run
    derives: class counts, step numbers, modules); a required field in neither is a TypeError
    naming it."""

    @classmethod
    def from_config(cls, section, **computed):
        names = {f.name for f in dataclasses.fields(cls)} - set(computed)
        return cls(**{k: section[k] for k in names if k in section}, **computed)
