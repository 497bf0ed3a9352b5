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
    own = [n for n, v in vars(mod).items() if not n.startswith("_")
           and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == name]
    assert set(own) <= set(mod.__all__), sorted(set(own) - set(mod.__all__))


def test_pruning_api_at_package_level():
    import jax.numpy as jnp

    import jaxmed.pruning

    params = {"d": {"kernel": jnp.arange(1.0, 11.0).reshape(2, 5)}}
    (masks,) = jaxmed.pruning.magnitude_masks(params, [0.3])
    assert jaxmed.pruning.sparsity(masks) == pytest.approx(0.3)
    assert not bool(masks["d"]["kernel"][0, :3].any())  # the three smallest weights
