"""Model zoo: output conventions, bf16 compute with float32 params, sown intermediates, widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.models import create_model
from jaxmed.models.common import sown


@pytest.mark.parametrize("name, kw, size, n_acts, n_feats", [
    ("resnet18", dict(stem="small", width=4), 16, 8, 32),
    ("resnet50", dict(width=4), 32, 32, 128),
    ("resnet56", dict(width=4), 16, 27, 16),
    ("densenet121", {}, 32, 58, 1024),
    ("alexnet", {}, 64, 5, 4096),
    ("vit_s", dict(patch=8), 16, 12, 384),
])
def test_output_conventions(name, kw, size, n_acts, n_feats):
    """Shapes only (traced, nothing computed): logits, features, one activation per unit."""
    model = create_model(name, 3, **kw)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert "intermediates" not in variables  # init never keeps the sown activations
    (logits, feats), inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, features=True, mutable=["intermediates"]), variables, x)
    acts = sown(inter["intermediates"])
    assert logits.shape == (2, 3) and feats.shape == (2, n_feats)
    assert len(acts) == n_acts and all(a.shape[0] == 2 for a in acts.values())
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 3)


def test_sown_post_relu_units_without_changing_logits():
    model = create_model("resnet8", 3, width=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    logits, inter = model.apply(variables, x, mutable=["intermediates"])
    acts = sown(inter["intermediates"])
    assert sorted(acts) == ["layer1_0/conv1", "layer2_0/conv1", "layer3_0/conv1"]
    assert acts["layer2_0/conv1"].shape == (2, 8, 8, 8)
    assert all(float(a.min()) == 0.0 and float(a.max()) > 0 for a in acts.values())
    np.testing.assert_allclose(model.apply(variables, x), logits, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    model = create_model("resnet18", 4, stem="small", width=4, dtype="bfloat16")
    x = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, inter = model.apply(variables, x, mutable=["intermediates"])
    assert sown(inter["intermediates"])["layer1_0/conv1"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32  # logits come back in float32


def test_inner_widths_shape_the_blocks():
    model = create_model("resnet56", 2, width=4, inner_widths=[(k % 4 + 1,) for k in range(27)])
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))
    assert v["params"]["layer1_2"]["conv1"]["kernel"].shape == (3, 3, 4, 3)
    assert v["params"]["layer1_2"]["conv2"]["kernel"].shape == (3, 3, 3, 4)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="resnet19"):
        create_model("resnet19", 2)
