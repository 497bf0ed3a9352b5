"""Losses against PyTorch / numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(12, 5)).astype(np.float32) * 2
LABELS = RNG.integers(0, 5, 12)
COUNTS = np.array([500, 200, 50, 10, 3])


def test_cross_entropy_with_label_smoothing_matches_torch():
    for eps in (0.0, 0.1):
        want = F.cross_entropy(torch.tensor(LOGITS), torch.tensor(LABELS), label_smoothing=eps,
                               reduction="none").numpy()
        np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS, eps), want, rtol=1e-5)


def test_bce_matches_torch():
    t = (RNG.random((12, 5)) < 0.4).astype(np.float32)
    want = F.binary_cross_entropy_with_logits(torch.tensor(LOGITS), torch.tensor(t),
                                              reduction="none").mean(1).numpy()
    np.testing.assert_allclose(losses.binary_cross_entropy(LOGITS, t), want, rtol=1e-5)


def test_kd_matches_torch_kl_div():
    teacher = RNG.normal(size=(12, 5)).astype(np.float32)
    T = 3.0
    want = F.kl_div(F.log_softmax(torch.tensor(LOGITS) / T, -1),
                    F.log_softmax(torch.tensor(teacher) / T, -1), log_target=True,
                    reduction="none").sum(-1).numpy() * T * T
    np.testing.assert_allclose(losses.kd(LOGITS, teacher, T), want, rtol=1e-5, atol=1e-6)


def test_balanced_softmax_adds_log_prior():
    want = F.cross_entropy(torch.tensor(LOGITS) + torch.log(torch.tensor(COUNTS / COUNTS.sum(),
                                                                          dtype=torch.float32)),
                           torch.tensor(LABELS), reduction="none").numpy()
    np.testing.assert_allclose(losses.balanced_softmax(LOGITS, LABELS, COUNTS), want, rtol=1e-5)


def test_focal_and_ldam_formulas():
    p = np.exp(LOGITS - LOGITS.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p[np.arange(12), LABELS]
    np.testing.assert_allclose(losses.focal(LOGITS, LABELS, 2.0), -(1 - py) ** 2 * np.log(py),
                               rtol=1e-4)
    m = COUNTS ** -0.25
    m = m * 0.5 / m.max()
    adj = LOGITS.copy()
    adj[np.arange(12), LABELS] -= m[LABELS]
    want = F.cross_entropy(torch.tensor(30 * adj), torch.tensor(LABELS), reduction="none").numpy()
    np.testing.assert_allclose(losses.ldam(LOGITS, LABELS, COUNTS), want, rtol=1e-4)


def test_gce_gradient_is_q_py_q_times_ce_gradient():
    q = 0.7
    g_gce = jax.grad(lambda z: losses.gce(z, LABELS, q).sum())(jnp.asarray(LOGITS))
    g_ce = jax.vmap(jax.grad(lambda z, y: losses.cross_entropy(z[None], y[None])[0]))(
        jnp.asarray(LOGITS), jnp.asarray(LABELS))
    py = jnp.exp(-losses.cross_entropy(LOGITS, LABELS))
    np.testing.assert_allclose(g_gce, (q * py**q)[:, None] * g_ce, rtol=1e-5, atol=1e-7)


def test_weighted_mean_ignores_zero_weights():
    per = jnp.array([1.0, 2.0, 100.0])
    assert float(losses.weighted_mean(per, jnp.array([1, 1, 0]))) == pytest.approx(1.5)
