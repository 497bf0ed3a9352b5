"""Segmentation pieces: IoU / Dice / ISIC thresholded Jaccard (scikit-learn and numpy oracles),
the Dice + BCE loss, the ResNet U-Net (shapes, dtypes, torchvision encoder loading)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from jaxmed import losses, metrics
from jaxmed.models import create_model
from jaxmed.models.unet import ResNetEncoder, load_encoder


def asymmetric_masks():
    """Probabilities (N, 6, 7) and 0/255 targets: random shapes of different sizes, a value at
    exactly 0.5, an image where both are empty, one with only the prediction empty, one with
    only the target empty."""
    rng = np.random.default_rng(0)
    target = (rng.random((7, 6, 7)) < rng.uniform(0.1, 0.8, (7, 1, 1))).astype(np.uint8) * 255
    probs = np.clip(target / 255.0 * rng.uniform(0.3, 1.0, target.shape)
                    + rng.uniform(0, 0.6, target.shape), 0, 1)
    probs[0, 0, 0] = 0.5
    target[4], probs[4] = 0, 0.1  # both empty
    probs[5] = 0.2                # nothing predicted
    target[6] = 0                 # nothing to find
    return probs, target


def test_iou_and_dice_match_sklearn_per_image():
    probs, target = asymmetric_masks()
    pred = probs >= 0.5
    ref_j = [jaccard_score(t.ravel() > 0, p.ravel(), zero_division=1.0)
             for t, p in zip(target, pred)]
    ref_d = [f1_score(t.ravel() > 0, p.ravel(), zero_division=1.0) for t, p in zip(target, pred)]
    j = metrics.iou_per_image(probs, target)
    np.testing.assert_allclose(j, ref_j)
    np.testing.assert_allclose(metrics.dice_per_image(probs, target), ref_d)
    assert j[4] == 1.0 and j[5] == 0.0 and j[6] == 0.0  # the documented empty-mask cases
    assert len(set(np.round(j[:4], 6))) == 4  # every image scores differently
    # a trailing channel axis and 0/1 targets give the same numbers
    np.testing.assert_allclose(metrics.iou_per_image(probs[..., None], target[..., None] // 255),
                               ref_j)


def test_thresholded_jaccard_zeroes_images_below_065():
    target = np.zeros((4, 4, 5), np.uint8)
    target[:, :2] = 1  # 10 lesion pixels per image
    pred = target.astype(np.float32).copy()
    pred[0, 0, :4] = 0  # J = 6/10 -> counts 0
    pred[1, 0, :3] = 0  # J = 7/10
    pred[2, 3, :] = 1   # J = 10/15
    j = metrics.iou_per_image(pred, target)
    np.testing.assert_allclose(j, [0.6, 0.7, 10 / 15, 1.0])
    expected = (0.0 + 0.7 + 10 / 15 + 1.0) / 4
    assert metrics.thresholded_jaccard(pred, target) == pytest.approx(expected)
    m = metrics.segmentation_metrics(pred, target)
    assert m["thresholded_jaccard"] == pytest.approx(expected)
    assert m["iou"] == pytest.approx(np.mean(j))
    assert m["dice"] == pytest.approx(np.mean(2 * j / (1 + j)))  # Dice = 2J / (1 + J)
    with pytest.raises(ValueError, match=r"\(4, 4, 5\).*\(4, 4, 4\)"):
        metrics.iou_per_image(pred, target[:, :, :4])


def test_dice_bce_matches_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (3, 5, 4, 1)).astype(np.float32)
    targets = (rng.random((3, 5, 4, 1)) < [[[[0.2]]], [[[0.7]]], [[[0.0]]]]).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).reshape(3, -1).mean(1)
    inter = (p * targets).reshape(3, -1).sum(1)
    dice = (2 * inter + 1) / (p.reshape(3, -1).sum(1) + targets.reshape(3, -1).sum(1) + 1)
    got = losses.dice_bce(jnp.asarray(logits), jnp.asarray(targets), dice_weight=0.7,
                          bce_weight=1.3)
    np.testing.assert_allclose(got, 1.3 * bce + 0.7 * (1 - dice), rtol=1e-5)
    # empty target, confidently empty prediction: soft Dice loss ~0 (smooth keeps it defined)
    empty = losses.soft_dice_loss(jnp.full((1, 4, 4), -30.0), jnp.zeros((1, 4, 4)))
    assert float(empty[0]) < 1e-6
    g = jax.grad(lambda x: losses.dice_bce(x, jnp.zeros((1, 4, 4))).sum())(jnp.zeros((1, 4, 4)))
    assert np.isfinite(np.asarray(g)).all()
    with pytest.raises(ValueError, match="differ"):
        losses.dice_bce(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 4)))


def concrete(shapes, seed=0):
    """Variables for a traced variables tree without running init (slow to compile on CPU):
    He-normal kernels, unit BN scales and variances, zero biases and means."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype)
        return (np.ones if name in ("scale", "var") else np.zeros)(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_unet_bf16_small_stem_32px():
    model = create_model("unet_resnet18", 1, stem="small", width=8, dtype="bfloat16")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = concrete(shapes)

    @jax.jit
    def run(v, x):
        train_out = model.apply(v, x, train=True, mutable=["batch_stats"])
        return train_out, model.apply(v, x, features=True)

    (logits, new_state), (eval_logits, feats) = run(variables, x)
    for out in (logits, eval_logits):
        assert out.shape == (2, 32, 32, 1) and out.dtype == jnp.float32
        assert np.isfinite(np.asarray(out)).all() and float(jnp.std(out)) > 0
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables["batch_stats"],
                           new_state["batch_stats"])
    assert all(jax.tree.leaves(changed["decoder0"])) and all(jax.tree.leaves(changed["encoder"]))
    assert feats.shape == (2, 64) and feats.dtype == jnp.float32


@pytest.mark.parametrize("name, kw, size, levels", [
    ("unet_resnet18", dict(width=8), 36, 5),  # ImageNet stem, odd sizes: resize, not repeat
    ("unet_resnet50", dict(width=4, stem="small"), 16, 4),
])
def test_unet_reaches_the_input_resolution(name, kw, size, levels):
    model = create_model(name, 2, **kw)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(model.apply, v, x).shape == (1, size, size, 2)
    assert sorted(k for k in v["params"] if k.startswith("decoder")) == [
        f"decoder{i}" for i in range(levels)]


def shapes(tree):
    return jax.tree.map(lambda s: tuple(s.shape), tree)


@pytest.mark.parametrize("resnet, kw", [("resnet18", dict(stem="small", width=8)),
                                        ("resnet50", dict(width=4))])
def test_encoder_variables_are_the_resnets(resnet, kw):
    """Same names and shapes as the ResNet's variables minus its head: what convert.py needs."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    unet = jax.eval_shape(create_model(f"unet_{resnet}", 1, **kw).init, jax.random.PRNGKey(0), x)
    net = jax.eval_shape(create_model(resnet, 5, **kw).init, jax.random.PRNGKey(0), x)
    net["params"].pop("fc")
    assert shapes(unet["params"]["encoder"]) == shapes(net["params"])
    assert shapes(unet["batch_stats"]["encoder"]) == shapes(net["batch_stats"])


def test_torchvision_checkpoint_loads_into_the_encoder():
    """A torchvision-layout ResNet-18 (written in the test suite, random BN statistics) loads
    into the U-Net's encoder: every stage output equals PyTorch's; the decoder is untouched."""
    torch = pytest.importorskip("torch")
    from tests import torch_reference as ref

    torch.manual_seed(0)
    net = ref.randomize_bn(ref.ResNet(ref.BasicBlock, (2, 2, 2, 2), 7)).eval()
    model = create_model("unet_resnet18", 1)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    variables = load_encoder(init, net.state_dict(), "resnet18")
    assert variables["params"]["head"] is init["params"]["head"]
    encoder = ResNetEncoder(stage_sizes=(2, 2, 2, 2))
    enc_vars = {c: variables[c]["encoder"] for c in ("params", "batch_stats")}
    outs = jax.jit(lambda v, x: encoder.apply(v, x))(enc_vars, x)
    with torch.no_grad():
        t = torch.relu(net.bn1(net.conv1(torch.from_numpy(x.transpose(0, 3, 1, 2)))))
        expected = [t]
        t = torch.nn.functional.max_pool2d(t, 3, 2, 1)
        for i in range(4):
            t = getattr(net, f"layer{i + 1}")(t)
            expected.append(t)
    assert len(outs) == 5
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-4, rtol=1e-4)
    bad = ref.ResNet(ref.Bottleneck, (3, 4, 6, 3), 7).state_dict()
    with pytest.raises(ValueError, match="layer1_0/conv1/kernel"):
        load_encoder(init, bad, "resnet50")
