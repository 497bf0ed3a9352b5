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


# ------------------------------------------------------------------ long-tailed losses and KD
def _np_ce(z, y):
    z = z - z.max(1, keepdims=True)
    return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))


def _np_effective_number_weights(counts, beta):
    w = np.array([(1 - beta) / (1 - beta**n) if n > 0 else 0.0 for n in counts])
    return w / w.sum() * (np.asarray(counts) > 0).sum()


def test_class_balanced_weights_and_loss_match_numpy():
    for beta in (0.9999, 0.99):
        np.testing.assert_allclose(losses.class_balanced_weights(COUNTS, beta),
                                   _np_effective_number_weights(COUNTS, beta), rtol=1e-5)
    w = _np_effective_number_weights(COUNTS, 0.999)
    assert w[4] > w[3] > w[2] > w[1] > w[0]  # rarer classes weigh more
    got = losses.class_balanced(LOGITS, LABELS, COUNTS, 0.999)
    np.testing.assert_allclose(got, w[LABELS] * _np_ce(LOGITS, LABELS), rtol=1e-5)
    # weighted_mean over the plain CE is torch's CrossEntropyLoss(weight=w) normalisation
    want = F.cross_entropy(torch.tensor(LOGITS), torch.tensor(LABELS),
                           weight=torch.tensor(w, dtype=torch.float32)).item()
    got = losses.weighted_mean(losses.cross_entropy(LOGITS, LABELS), jnp.asarray(w)[LABELS])
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_class_balanced_weights_zero_for_absent_classes():
    w = losses.class_balanced_weights([40, 0, 7], 0.99)
    assert w[1] == 0 and np.isfinite(w).all()
    np.testing.assert_allclose(w.sum(), 2.0, rtol=1e-6)


def test_drw_weights_switch_at_start_step_and_ldam_drw_matches_torch():
    fn = jax.jit(lambda step: losses.drw_weights(COUNTS, step, 80))
    np.testing.assert_array_equal(fn(79), np.ones(5, np.float32))
    cb = _np_effective_number_weights(COUNTS, 0.9999)
    np.testing.assert_allclose(fn(80), cb, rtol=1e-5)
    np.testing.assert_allclose(fn(200), cb, rtol=1e-5)
    m = COUNTS ** -0.25
    m = m * 0.5 / m.max()
    adj = LOGITS.copy()
    adj[np.arange(12), LABELS] -= m[LABELS]
    want = F.cross_entropy(torch.tensor(30 * adj), torch.tensor(LABELS),
                           weight=torch.tensor(cb, dtype=torch.float32), reduction="none").numpy()
    np.testing.assert_allclose(losses.ldam(LOGITS, LABELS, COUNTS, weights=fn(100)), want,
                               rtol=1e-4)


def test_logit_adjusted_matches_numpy_and_tau_one_is_balanced_softmax():
    prior = COUNTS / COUNTS.sum()
    for tau in (0.5, 2.0):
        want = _np_ce(LOGITS + tau * np.log(prior), LABELS)
        np.testing.assert_allclose(losses.logit_adjusted(LOGITS, LABELS, COUNTS, tau), want,
                                   rtol=1e-5)
    np.testing.assert_allclose(losses.logit_adjusted(LOGITS, LABELS, COUNTS, 1.0),
                               losses.balanced_softmax(LOGITS, LABELS, COUNTS), rtol=1e-6)
    np.testing.assert_allclose(losses.classification_loss("logit_adjusted", LOGITS, LABELS,
                                                          class_counts=COUNTS),
                               _np_ce(LOGITS + np.log(prior), LABELS), rtol=1e-5)


def test_balanced_softmax_and_focal_match_numpy():
    prior = COUNTS / COUNTS.sum()
    np.testing.assert_allclose(losses.balanced_softmax(LOGITS, LABELS, COUNTS),
                               _np_ce(LOGITS + np.log(prior), LABELS), rtol=1e-5)
    ce = _np_ce(LOGITS, LABELS)
    np.testing.assert_allclose(losses.focal(LOGITS, LABELS, 2.0), (1 - np.exp(-ce)) ** 2 * ce,
                               rtol=1e-4)


def test_feature_and_cosine_kd_match_numpy():
    s = RNG.normal(size=(6, 7)).astype(np.float32)
    t = RNG.normal(size=(6, 7)).astype(np.float32) * 3 + 1
    np.testing.assert_allclose(losses.feature_kd(s, t), ((s - t) ** 2).mean(1), rtol=1e-5)
    cos = (s * t).sum(1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
    got = losses.cosine_kd(s, t)
    np.testing.assert_allclose(got, 2 - 2 * cos, rtol=1e-5, atol=1e-6)
    # scale-invariant, 0 for aligned vectors, 4 for opposite ones, finite for a zero vector
    np.testing.assert_allclose(losses.cosine_kd(5 * s, t), got, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.cosine_kd(s, 2 * s), 0.0, atol=1e-6)
    np.testing.assert_allclose(losses.cosine_kd(s, -s), 4.0, rtol=1e-6)
    assert float(losses.cosine_kd(np.zeros((1, 7)), t[:1])[0]) == pytest.approx(2.0)
    byol = 2 - 2 * (F.normalize(torch.tensor(s), dim=-1) * F.normalize(torch.tensor(t), dim=-1)
                    ).sum(-1)
    np.testing.assert_allclose(got, byol.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------- references' reductions, normalisation, BKD
def _ldam_adjusted(logits, labels, counts):
    m = counts ** -0.25
    m = m * 0.5 / m.max()
    adj = logits.copy()
    adj[np.arange(len(labels)), labels] -= m[labels]
    return adj


def test_normalised_sample_weights_give_torch_weighted_reduction():
    """mean over the valid rows of w_y-scaled LDAM = F.cross_entropy(weight=w) (sum(w l) /
    sum(w)) on those rows, not mean(w_y l)."""
    w = _np_effective_number_weights(COUNTS, 0.9999).astype(np.float32)
    valid = np.ones(12, bool)
    valid[[3, 8]] = False  # padded rows count nowhere, in the numerator or the normaliser
    per = losses.ldam(LOGITS, LABELS, COUNTS) * losses.normalised_sample_weights(
        w, LABELS, valid)
    got = float(losses.weighted_mean(per, valid))
    adj = _ldam_adjusted(LOGITS, LABELS, COUNTS)
    want = F.cross_entropy(torch.tensor(30 * adj[valid]), torch.tensor(LABELS[valid]),
                           weight=torch.tensor(w)).item()
    assert got == pytest.approx(want, rel=1e-5)
    plain = float(jnp.mean(losses.ldam(LOGITS, LABELS, COUNTS, weights=w)[valid]))
    assert abs(plain - want) > 0.05 * want  # what mean(w_y l) would have given instead


def test_l2_normalize_is_torch_normalize_with_finite_gradients_on_a_zero_row():
    from jaxmed.methods.fopro_kd.step import cosine_logits

    x = RNG.normal(size=(4, 6)).astype(np.float32)
    x[2] = 0.0  # an all-zero row (a dead ReLU feature vector)
    r = RNG.normal(size=(4, 6)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    (F.normalize(xt, dim=-1) * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(losses.l2_normalize(x), F.normalize(torch.tensor(x), dim=-1),
                               rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda a: jnp.sum(losses.l2_normalize(a) * r))(jnp.asarray(x))
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-5, atol=1e-6 * 1e12)
    # EKD's cosine term: a zero student row has torch's finite gradient, not NaN
    t = RNG.normal(size=(4, 6)).astype(np.float32)
    gk = jax.grad(lambda a: jnp.sum(losses.cosine_kd(a, t)))(jnp.asarray(x))
    xt.grad = None
    byol = 2 - 2 * (F.normalize(xt, dim=-1) * F.normalize(torch.tensor(t), dim=-1)).sum(-1)
    byol.sum().backward()
    assert np.isfinite(np.asarray(gk)).all()
    np.testing.assert_allclose(gk, xt.grad.numpy(), rtol=1e-5, atol=1.0)  # (|g| ~ 1e12 there)
    # LDAM's NormedLinear (cosine logits) with a zero feature row and a zero class column
    kernel = RNG.normal(size=(6, 5)).astype(np.float32)
    kernel[:, 1] = 0.0
    gh, gw = jax.grad(lambda h, k: jnp.sum(cosine_logits(h, {"fc": {"kernel": k}}) * LOGITS[:4]),
                      argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
    ht, kt = torch.tensor(x, requires_grad=True), torch.tensor(kernel, requires_grad=True)
    (torch.mm(F.normalize(ht, dim=1), F.normalize(kt, dim=0)) * torch.tensor(LOGITS[:4])
     ).sum().backward()
    assert np.isfinite(np.asarray(gh)).all() and np.isfinite(np.asarray(gw)).all()
    np.testing.assert_allclose(gh, ht.grad.numpy(), rtol=1e-5, atol=1.0)
    np.testing.assert_allclose(gw, kt.grad.numpy(), rtol=1e-5, atol=1.0)


def test_balanced_kd_matches_the_bkd_reference():
    """BKD (Zhang et al.'s BKDLoss): the teacher's softened outputs times w_c, renormalised,
    then T^2 KL per sample; with equal weights it is Hinton KD."""
    teacher = RNG.normal(size=(12, 5)).astype(np.float32) * 2
    w = _np_effective_number_weights(COUNTS, 0.9999).astype(np.float32)
    T = 2.0
    pred_t = F.softmax(torch.tensor(teacher) / T, dim=1) * torch.tensor(w)
    pred_t = pred_t / pred_t.sum(1)[:, None]
    want = F.kl_div(F.log_softmax(torch.tensor(LOGITS) / T, dim=1), pred_t,
                    reduction="none").sum(1).numpy() * T * T
    got = losses.balanced_kd(LOGITS, teacher, w, T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # BKDLoss's reduction: kl_div(...).mean(dim=0).sum() * T^2, the batch mean of `got`
    bkd = F.kl_div(F.log_softmax(torch.tensor(LOGITS) / T, dim=1), pred_t,
                   reduction="none").mean(0).sum().item() * T * T
    assert float(jnp.mean(got)) == pytest.approx(bkd, rel=1e-5)
    np.testing.assert_allclose(losses.balanced_kd(LOGITS, teacher, np.full(5, 0.3), T),
                               losses.kd(LOGITS, teacher, T), rtol=1e-5, atol=1e-6)
    w0 = w.copy()
    w0[1] = 0.0  # a class that weighs 0 drops out of the target, the loss stays finite
    z = losses.balanced_kd(LOGITS, teacher, w0, T)
    assert np.isfinite(np.asarray(z)).all()
