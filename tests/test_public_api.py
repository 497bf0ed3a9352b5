"""The packages export their public functions at package level (`jaxmed.pruning.magnitude_masks`)
and every exported name exists."""

import importlib
import inspect

import pytest

PACKAGES = ["jaxmed.pruning", "jaxmed.models", "jaxmed.losses", "jaxmed.metrics", "jaxmed.data"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist_and_cover_the_public_functions(name):
    mod = importlib.import_module(name)
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, missing
    assert set(public_names(mod, name)) <= set(mod.__all__), sorted(
        set(public_names(mod, name)) - set(mod.__all__))


def public_names(mod, name: str) -> list[str]:
    """Functions and classes of the package's namespace defined in it or in its submodules
    (a package re-exports them from its modules: `jaxmed.pruning.masks.sparsity`)."""
    return [n for n, v in vars(mod).items() if not n.startswith("_")
            and (inspect.isfunction(v) or inspect.isclass(v))
            and (v.__module__ == name or v.__module__.startswith(name + "."))]


def test_public_names_see_what_a_package_reexports():
    """The check above would pass on an empty list: it must see the re-exported functions."""
    import jaxmed.pruning

    names = public_names(jaxmed.pruning, "jaxmed.pruning")
    assert {"magnitude_masks", "sparsity", "scores_for"} <= set(names)


@pytest.mark.parametrize("method", sorted(__import__("jaxmed.methods").methods.REGISTRY))
def test_every_method_keeps_the_contract(method):
    import jaxmed.methods

    mod = jaxmed.methods.load(method)  # TypeError naming what is missing
    assert set(jaxmed.methods.CONTRACT) <= set(mod.__all__)
    assert not [n for n in mod.__all__ if not hasattr(mod, n)]
    assert isinstance(mod.HARMLESS_KEYS, tuple)
    assert "data.num_workers" not in mod.HARMLESS_KEYS  # the iterator position depends on it
    section = {"tear": "ssl", "fopro_kd": "kd", "htl": "htl", "biaspruner": "continual"}.get(
        method)
    if section:  # a comparison: adding a method or a seed never counts as a config change
        assert {f"{section}.methods", f"{section}.seeds"} <= set(mod.HARMLESS_KEYS)


def test_pruning_api_at_package_level():
    import jax.numpy as jnp

    import jaxmed.pruning

    params = {"d": {"kernel": jnp.arange(1.0, 11.0).reshape(2, 5)}}
    (masks,) = jaxmed.pruning.magnitude_masks(params, [0.3])
    assert jaxmed.pruning.sparsity(masks) == pytest.approx(0.3)
    assert not bool(masks["d"]["kernel"][0, :3].any())  # the three smallest weights
