"""HTL identification on planted structure: tiny models whose smallest-magnitude weights are the
only ones that matter for known samples, so the pruned copies provably disagree there."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import metrics
from jaxmed.methods.htl import identify

SPARSITIES = (0.3, 0.5, 0.6)  # of 8 weights: prune 2, 4, 5


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, use_bias=False, name="fc")(x)


# Feature 0 -> class 0 and feature 1 -> class 1 with large weights; features 2 and 3 are weak
# cues with the smallest weights (row 3 smallest). W[0, 0] = 2.9 is the smallest large weight.
W = np.array([[2.9, -3.0], [-3.1, 3.2], [-0.05, 0.05], [0.04, -0.04]], np.float32)
PLANTED = [3, 17, 28]   # only the weak cue of row 2 says "class 1": flips once row 2 is pruned
BORDERLINE = 11         # flips only at the top level (W[0, 0] pruned): a minority of levels


def classification_set(n=40):
    rng = np.random.default_rng(0)
    x = np.zeros((n, 4), np.float32)
    y = rng.integers(0, 2, n)
    x[np.arange(n), y] = rng.uniform(0.5, 1.5, n)
    x[:, 2:] = rng.uniform(-1, 1, (n, 2))
    x[PLANTED] = [0.01, 0.0, 1.0, 0.0]
    x[BORDERLINE] = [1.0, 0.9, 0.0, 0.0]
    return jnp.asarray(x)


@pytest.fixture(scope="module")
def linear_levels():
    params = {"fc": {"kernel": jnp.asarray(W)}}
    masks = identify.level_masks(params, SPARSITIES)
    model = Linear()
    predict = identify.make_level_predictor(lambda p, x, _: model.apply({"params": p}, x),
                                            task="classification")
    dense, pruned = predict(params, masks, classification_set(), None)
    return params, masks, model, dense, pruned


def test_level_masks_prune_the_smallest_weights_at_each_level(linear_levels):
    _, masks, *_ = linear_levels
    m = np.asarray(masks["fc"]["kernel"])
    assert m.dtype == bool and m.shape == (3, 4, 2)
    assert [int((~m[i]).sum()) for i in range(3)] == [2, 4, 5]
    assert not m[0, 3].any() and m[0, :3].all()               # 0.3: the 0.04s
    assert not m[1, 2:].any() and m[1, :2].all()              # 0.5: + the 0.05s
    assert not m[2, 0, 0] and m[2, 0, 1] and m[2, 1].all()    # 0.6: + W[0, 0] = 2.9


def test_pruned_predictions_equal_masked_dense_forwards(linear_levels):
    params, masks, model, dense, pruned = linear_levels
    x = np.asarray(classification_set())
    m = np.asarray(masks["fc"]["kernel"])
    np.testing.assert_allclose(dense, x @ W, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pruned, np.stack([x @ (W * m[i]) for i in range(3)]),
                               rtol=1e-6, atol=1e-6)
    vmapped = identify.make_level_predictor(lambda p, x, _: model.apply({"params": p}, x),
                                            task="classification", level_axis="vmap")
    np.testing.assert_allclose(vmapped(params, masks, jnp.asarray(x), None)[1], pruned,
                               rtol=1e-6)


def test_classification_htl_set_is_exactly_the_planted_samples(linear_levels):
    *_, dense, pruned = linear_levels
    disagree, score = identify.classification_disagreement(dense, pruned)
    assert np.flatnonzero(identify.select_htl(disagree, score)).tolist() == PLANTED
    # the score: the pruned copies' mean probability off the dense class (numpy oracle)
    p = np.exp(pruned) / np.exp(pruned).sum(-1, keepdims=True)
    d = np.asarray(dense).argmax(-1)
    np.testing.assert_allclose(score, 1 - p[:, np.arange(40), d].mean(0), atol=1e-6)
    # top q: the borderline sample (confident flip at one level) outranks the planted ones
    top = identify.select_htl(disagree, score, top_q=4 / 40)
    assert np.flatnonzero(top).tolist() == sorted(PLANTED + [BORDERLINE])


def test_vote_ties_that_include_the_dense_class_are_agreement():
    votes = np.array([[3, 1, 3, 1],   # tie 1-3, dense class among the modes -> agree
                      [1, 2, 3, 0],   # four-way tie including 3 -> agree
                      [1, 1, 2, 2],   # tie between two other classes -> disagree
                      [3, 3, 1, 2],   # dense class is the mode -> agree
                      [1, 1, 3, 2]])  # another class is the mode -> disagree
    pruned = jnp.asarray(np.eye(4)[votes.T] * 5, jnp.float32)  # [L=4, N=5, C=4] logits
    dense = jnp.asarray(np.eye(4)[[3] * 5], jnp.float32)       # dense says class 3 (the last:
    # a lowest-index tie break would not agree)
    disagree, _ = identify.classification_disagreement(dense, pruned)
    assert np.asarray(disagree).tolist() == [False, False, True, False, True]


class PixelLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (1, 1), use_bias=False, name="head")(x)


def segmentation_set():
    """Channel 0: a high-contrast lesion (weight 3); channel 1: a low-contrast one (weight 0.05,
    the smallest); channel 2 unused here (weight 0.5). Images 0-5 normal, 6-8 low contrast
    (planted), 9 no lesion at all."""
    rng = np.random.default_rng(1)
    imgs = np.zeros((10, 8, 8, 3), np.float32)
    for i in range(10):
        lesion = np.zeros((8, 8), bool)
        r, c = rng.integers(0, 5, 2)
        lesion[r:r + rng.integers(2, 4), c:c + rng.integers(2, 5)] = True
        sign = np.where(lesion, 1.0, -1.0)
        if i < 6:
            imgs[i, ..., 0] = sign
            imgs[i, ..., 1] = rng.uniform(-1, 1, (8, 8))
        elif i < 9:
            imgs[i, ..., 0] = -0.01
            imgs[i, ..., 1] = sign
        else:
            imgs[i, ..., 0] = -1.0
    return jnp.asarray(imgs)


def test_segmentation_htl_set_is_exactly_the_low_contrast_lesions():
    params = {"head": {"kernel": jnp.asarray([3.0, 0.05, 0.5]).reshape(1, 1, 3, 1)}}
    masks = identify.level_masks(params, (0.3, 0.6, 0.9))  # prune 1, 2, 3 of the 3 weights
    model = PixelLinear()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))  # the sharded program
    predict = identify.make_level_predictor(lambda p, x, _: model.apply({"params": p}, x),
                                            task="segmentation", mesh=mesh)
    x = segmentation_set()
    dense, level_iou = predict(params, masks, x, None)
    assert dense.shape == (10, 8, 8, 1) and level_iou.shape == (3, 10)
    # normal: kept until everything is pruned; planted: lost at once; no lesion: empty == empty
    expected = np.array([[1, 1, 0]] * 6 + [[0, 0, 0]] * 3 + [[1, 1, 1]], np.float32).T
    np.testing.assert_allclose(level_iou, expected)
    disagree, score = identify.segmentation_disagreement(level_iou, iou_threshold=0.5)
    assert np.flatnonzero(identify.select_htl(disagree, score)).tolist() == [6, 7, 8]
    np.testing.assert_allclose(score, 1 - expected.mean(0), rtol=1e-6)
    anyrule, _ = identify.segmentation_disagreement(level_iou, 0.5, rule="any")
    assert np.flatnonzero(anyrule).tolist() == list(range(9))
    # the in-program IoU equals the metric's on the pruned logits computed outside
    pruned = identify.masked_outputs(lambda p: model.apply({"params": p}, x), params, masks)
    for lvl in range(3):
        np.testing.assert_allclose(
            level_iou[lvl], metrics.iou_per_image(np.asarray(pruned[lvl] > 0),
                                                  np.asarray(dense > 0)), rtol=1e-6)
    np.testing.assert_allclose(identify.segmentation_level_iou(dense, pruned), level_iou)


def test_majority_needs_more_than_half_of_the_levels():
    iou = jnp.asarray([[0.1, 0.9, 0.4], [0.2, 0.8, 0.2], [0.9, 0.9, 0.3], [0.9, 0.1, 0.9]])
    disagree, _ = identify.segmentation_disagreement(iou, iou_threshold=0.5)  # L = 4
    assert np.asarray(disagree).tolist() == [False, False, True]       # 2 / 4 low is a tie
    disagree, _ = identify.segmentation_disagreement(iou, iou_threshold=0.85)
    assert np.asarray(disagree).tolist() == [False, False, True]       # 0.8 joins: 2 / 4
    disagree, _ = identify.segmentation_disagreement(iou, iou_threshold=0.95)
    assert np.asarray(disagree).tolist() == [True, True, True]


def test_select_htl_top_q_and_bad_input():
    score = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    disagree = np.array([False, False, True, False, False])
    assert identify.select_htl(disagree, score).tolist() == disagree.tolist()
    assert np.flatnonzero(identify.select_htl(disagree, score, top_q=0.4)).tolist() == [1, 3]
    # a tie: the lower index first
    assert np.flatnonzero(identify.select_htl(disagree, score, top_q=0.2)).tolist() == [1]
    with pytest.raises(ValueError, match="top_q"):
        identify.select_htl(disagree, score, top_q=1.5)
    with pytest.raises(ValueError, match="rule"):
        identify.segmentation_disagreement(jnp.ones((2, 3)), rule="most")
    with pytest.raises(ValueError, match="sparsity"):
        identify.level_masks({"fc": {"kernel": jnp.ones((2, 2))}}, ())
