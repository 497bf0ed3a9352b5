"""TEAR / SSL pieces against numpy references written here (USB's hooks re-done in numpy).

Asymmetric inputs: different class counts per piece, skewed Dirichlet confidences, padded
rows in most batches and one all-padded batch. Every stateful piece runs through a jitted
wrapper over several batches and must compile once.
"""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from jaxmed.methods.tear import adapl, prototypes, pseudo_labels as pl, teacher, thresholds as th

RNG = np.random.default_rng(0)


def probs_batch(rng, b, c, alpha_scale=0.4):
    """Skewed confidences: class c gets Dirichlet concentration growing with c."""
    alpha = alpha_scale * (1.0 + np.arange(c))
    return rng.dirichlet(alpha, size=b).astype(np.float32)


def batches(rng, steps, b, c, num_slots=None):
    """(probs, index, valid) per step; index unique within a batch; step 3 all padded."""
    out = []
    for s in range(steps):
        valid = np.ones(b, bool)
        valid[b - 1 - s % 3:] = False  # 1-3 padded rows
        if s == 3:
            valid[:] = False
        index = (rng.permutation(num_slots)[:b] if num_slots else np.arange(b)).astype(np.int32)
        out.append((probs_batch(rng, b, c), index, valid))
    return out


def np_renorm(p):
    return p / p.sum(-1, keepdims=True)


# ---------------------------------------------------------------------- pseudo labels / DA
def test_pseudo_labels_and_sharpen():
    logits = RNG.normal(size=(6, 5)).astype(np.float32) * 3
    e = np.exp(logits / 0.7)
    np.testing.assert_allclose(pl.soft_pseudo_label(logits, 0.7), np_renorm(e), rtol=1e-5)
    np.testing.assert_array_equal(pl.hard_pseudo_label(logits), logits.argmax(-1))
    p = probs_batch(RNG, 6, 5)
    np.testing.assert_allclose(pl.sharpen(p, 0.5), np_renorm(p ** 2), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(th.fixed_threshold_mask(p, 0.6), (p.max(-1) >= 0.6) * 1.0)


_da = jax.jit(pl.distribution_alignment, static_argnames=("temperature",))


@pytest.mark.parametrize("variant", ["default", "target_sharpen"])
def test_da_queue_matches_reference_list(variant):
    c, length = 5, 32
    target = np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32) if variant != "default" else None
    temp = 0.5 if variant != "default" else None
    state, ref = pl.DAQueue.init(c, length), []
    for probs, _, valid in batches(np.random.default_rng(1), 37, 6, c):
        state, aligned = _da(state, probs, valid, target, temperature=temp)
        if valid.any():  # the reference pushes only batches with a real row
            ref.append(probs[valid].mean(0))
            ref = ref[-length:]
        want = probs / np.mean(ref, 0)
        if target is not None:
            want = want * target
        want = np_renorm(want)
        if temp is not None:
            want = np_renorm(want ** (1 / temp))
        np.testing.assert_allclose(aligned, want, rtol=2e-5, atol=1e-7)
    assert int(state.count) == 36  # 37 batches, one all padded
    assert _da._cache_size() <= 2


_ua_update = jax.jit(pl.uniform_align_update)


def test_softmatch_uniform_alignment_matches_numpy():
    c, m = 4, 0.9  # a small momentum so the EMA moves visibly
    state, p_model = pl.UniformAlignState.init(c), None
    for probs, _, valid in batches(np.random.default_rng(2), 8, 7, c):
        state = _ua_update(state, probs, valid, m)
        if valid.any():
            mean = probs[valid].mean(0)
            p_model = mean if p_model is None else m * p_model + (1 - m) * mean
        np.testing.assert_allclose(state.p_model, p_model, rtol=1e-5)
        want = np_renorm(probs * (1 / c + 1e-6) / (p_model + 1e-6))
        np.testing.assert_allclose(pl.uniform_align(state, probs), want, rtol=1e-5)
    assert _ua_update._cache_size() == 1


# ------------------------------------------------------------------------------ FlexMatch
class NpFlexMatch:
    """USB's FlexMatchThresholdingHook, numpy, with its persistent classwise_acc."""

    def __init__(self, n, c, warmup):
        self.sel, self.acc, self.n, self.c, self.warmup = np.full(n, -1), np.zeros(c), n, c, warmup

    def masking(self, probs, idx, valid, cutoff):
        maxp, pred = probs.max(-1), probs.argmax(-1)
        mask = maxp >= cutoff * (self.acc[pred] / (2.0 - self.acc[pred]))
        select = (maxp >= cutoff) & valid
        self.sel[idx[select]] = pred[select]
        counter = Counter(self.sel.tolist())
        if max(counter.values()) < self.n:
            wo = {k: v for k, v in counter.items() if k != -1}
            denom = max(counter.values()) if self.warmup else max(wo.values())
            self.acc = np.array([counter[i] / denom for i in range(self.c)])
        return mask.astype(np.float32)


def _flex_step(state, probs, index, valid, cutoff, warmup):
    mask = th.flexmatch_mask(state, probs, cutoff, warmup)
    return th.flexmatch_update(state, probs, index, valid, cutoff), mask


_flex = jax.jit(_flex_step, static_argnames=("warmup",))


@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_matches_usb_hook(warmup):
    n, c, cutoff = 30, 3, 0.7
    state, ref = th.FlexMatchState.init(n), NpFlexMatch(n, c, warmup)
    masks = []
    for probs, index, valid in batches(np.random.default_rng(3), 12, 8, c, n):
        before = np.asarray(state.selected).copy()
        state, mask = _flex(state, probs, index, valid, cutoff, warmup=warmup)
        want = ref.masking(probs, index, valid, cutoff)
        np.testing.assert_array_equal(mask, want)
        np.testing.assert_array_equal(state.selected, ref.sel)
        untouched = np.setdiff1d(np.arange(n), index[valid])  # padded rows wrote nothing
        np.testing.assert_array_equal(np.asarray(state.selected)[untouched], before[untouched])
        masks.append(want)
    status = np.asarray(th.flexmatch_learning_status(state, c, warmup))
    np.testing.assert_allclose(status, ref.acc, rtol=1e-6)
    assert len(set(np.round(status, 6))) == c  # classes learned at different rates
    assert 0 < np.mean(masks) < 1
    assert _flex._cache_size() <= 2  # one program per warmup flag


def test_flexmatch_unused_counts_only_unlabeled_slots():
    # 10 index slots, 6 of them unlabeled: 2 picked class 0, 1 class 2 -> 3 unused.
    state = th.FlexMatchState.init(10, num_unlabeled=6)
    state = state.replace(selected=state.selected.at[jnp.array([1, 4, 7])].set(
        jnp.array([0, 0, 2])))
    np.testing.assert_allclose(th.flexmatch_learning_status(state, 3, True), [2 / 3, 0, 1 / 3])
    np.testing.assert_allclose(th.flexmatch_learning_status(state, 3, False), [1, 0, 0.5])
    with pytest.raises(ValueError, match="num_unlabeled=11"):
        th.FlexMatchState.init(10, num_unlabeled=11)


# ------------------------------------------------------------------------------ FreeMatch
def _free_step(state, probs, valid, m):
    state = th.freematch_update(state, probs, valid, m)
    return state, th.freematch_mask(state, probs)


_free = jax.jit(_free_step)


def test_freematch_thresholds_match_numpy():
    c, m = 6, 0.8
    tau, p_model, hist = 1 / c, np.full(c, 1 / c), np.full(c, 1 / c)
    state, masks = th.FreeMatchState.init(c), []
    for probs, _, valid in batches(np.random.default_rng(4), 10, 9, c):
        state, mask = _free(state, probs, valid, m)
        if valid.any():
            pv = probs[valid]
            tau = m * tau + (1 - m) * pv.max(-1).mean()
            p_model = m * p_model + (1 - m) * pv.mean(0)
            hist = m * hist + (1 - m) * np.bincount(pv.argmax(-1), minlength=c) / len(pv)
        want = probs.max(-1) >= tau * (p_model / p_model.max())[probs.argmax(-1)]
        np.testing.assert_allclose(state.time_p, tau, rtol=1e-5)
        np.testing.assert_allclose(state.p_model, p_model, rtol=1e-5)
        np.testing.assert_allclose(state.label_hist, hist, rtol=1e-5)
        np.testing.assert_array_equal(mask, want)
        masks.append(want)
    assert 0 < np.mean(masks) < 1
    assert _free._cache_size() == 1


# ------------------------------------------------------------------------------ SoftMatch
def _soft_step(state, probs, valid, m):
    state = th.softmatch_update(state, probs, valid, m)
    return state, th.softmatch_weights(state, probs, 2.0)


_soft = jax.jit(_soft_step)


def test_softmatch_weights_match_numpy():
    c, m = 5, 0.3  # a small momentum: mu reaches the batch means, some weights fall below 1
    mu, var, state, ws = 1 / c, 1.0, th.SoftMatchState.init(c), []
    for probs, _, valid in batches(np.random.default_rng(5), 9, 8, c):
        state, w = _soft(state, probs, valid, m)
        if valid.sum() >= 2:
            mx = probs[valid].max(-1)
            mu, var = m * mu + (1 - m) * mx.mean(), m * var + (1 - m) * mx.var(ddof=1)
        gap = np.minimum(probs.max(-1) - mu, 0)
        want = np.exp(-gap ** 2 / (2 * var / 4.0))
        np.testing.assert_allclose([state.mu, state.var], [mu, var], rtol=1e-5)
        np.testing.assert_allclose(w, want, rtol=1e-5)
        assert np.all(np.asarray(w)[probs.max(-1) >= mu] == 1.0)
        ws.append(np.asarray(w))
    assert np.min(ws) < 0.9
    assert _soft._cache_size() == 1


# ---------------------------------------------------------------------------- EMA teacher
def test_ema_teacher_params_average_and_batch_stats_copy():
    params = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32), "b": jnp.ones(2)}
    stats = {"mean": jnp.arange(2.0)}
    t = teacher.EmaTeacher.init(params, stats)
    assert t.params["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
    new_p = jax.tree.map(lambda x: x + 1.0, params)
    new_s = {"mean": jnp.array([5.0, -2.0])}
    up = jax.jit(teacher.ema_teacher_update)
    t2 = up(t, new_p, new_s, 0.99)
    np.testing.assert_allclose(t2.params["w"], 0.99 * params["w"] + 0.01 * new_p["w"], rtol=1e-6)
    np.testing.assert_array_equal(t2.batch_stats["mean"], new_s["mean"])
    up(t2, params, stats, 0.99)
    assert up._cache_size() == 1


# ----------------------------------------------------------------------------------- AdaPL
def test_adapl_distances_match_numpy_and_scipy():
    ps, pt = probs_batch(RNG, 7, 5), probs_batch(RNG, 7, 5, 1.0)
    np.testing.assert_allclose(adapl.adapl_distance(ps, pt, "mse"), ((ps - pt) ** 2).mean(-1),
                               rtol=1e-5)
    np.testing.assert_allclose(adapl.adapl_distance(ps, pt, "kl"),
                               (pt * np.log(pt / ps)).sum(-1), rtol=1e-4)
    emd = [wasserstein_distance(np.arange(5), np.arange(5), a, b) for a, b in zip(ps, pt)]
    np.testing.assert_allclose(adapl.adapl_distance(ps, pt, "emd"), emd, rtol=1e-4, atol=1e-6)
    ent = -(ps * np.log(ps)).sum(-1)
    np.testing.assert_allclose(adapl.adapl_estimate(ps, pt, "kl", add_entropy=True),
                               (pt * np.log(pt / ps)).sum(-1) + ent, rtol=1e-4)
    with pytest.raises(ValueError, match="kind='l1'"):
        adapl.adapl_distance(ps, pt, "l1")


def _adapl_step(mem, ps, pt, index, valid, logits_s, mask):
    d = adapl.adapl_estimate(ps, pt, "kl")
    mem, d = adapl.adapl_memory_update(mem, d, index, valid, 0.6)
    eps = adapl.adapl_epsilon(d, 3.0)
    q = adapl.adapl_targets(jnp.argmax(pt, -1), eps, ps.shape[-1])
    return mem, eps, q, adapl.adapl_loss(logits_s, q, mask, valid)


_adapl = jax.jit(_adapl_step)


def test_adapl_memory_targets_and_loss_match_numpy():
    n, c, m, gamma = 25, 4, 0.6, 3.0
    rng = np.random.default_rng(6)
    mem, est, seen = adapl.AdaPLMemory.init(n), np.zeros(n), np.zeros(n, bool)
    for ps, index, valid in batches(rng, 8, 6, c, n):
        pt = probs_batch(rng, 6, c, 1.0)
        logits_s = rng.normal(size=(6, c)).astype(np.float32) * 2
        mask = (rng.random(6) < 0.7).astype(np.float32)
        mem, eps, q, loss = _adapl(mem, ps, pt, index, valid, logits_s, mask)
        d = (pt * np.log(pt / ps)).sum(-1)
        sm = np.where(seen[index], m * est[index] + (1 - m) * d, d)
        est[index[valid]], seen[index[valid]] = sm[valid], True
        want_eps = 1 / (1 + np.exp(-gamma * sm)) - 0.5
        want_q = (1 - want_eps)[:, None] * np.eye(c)[pt.argmax(-1)] + want_eps[:, None] / c
        logp = logits_s - np.log(np.exp(logits_s).sum(-1, keepdims=True))
        want_loss = (-(want_q * logp).sum(-1) * mask * valid).sum() / max(valid.sum(), 1)
        np.testing.assert_allclose(mem.estimate, est, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(mem.seen, seen)  # padded rows never marked seen
        np.testing.assert_allclose(eps, want_eps, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert 0 < seen.sum() < n
    assert _adapl._cache_size() == 1


def test_adapl_larger_estimate_softer_label():
    d = jnp.array([0.0, 0.2, 1.0, 5.0])
    q = adapl.adapl_targets(jnp.array([2, 2, 2, 2]), adapl.adapl_epsilon(d, 2.0), 3)
    top = np.asarray(q[:, 2])
    assert top[0] == 1.0 and np.all(np.diff(top) < 0) and np.all(top > q[:, 0])
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(adapl.adapl_epsilon(d, 2.0, "spec"),
                               1 - 1 / (1 + np.exp(-2 * np.asarray(d))), rtol=1e-6)


# ------------------------------------------------------------------------------------- IPH
def np_kmeans_step(x, c, valid):
    assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(-1)
    new, counts = c.copy(), np.zeros(len(c), int)
    for k in range(len(c)):
        rows = x[(assign == k) & valid]
        counts[k] = len(rows)
        if len(rows):
            new[k] = rows.mean(0)
    return new, counts


def planted_blobs(rng, sizes, d=6, spread=0.15):
    centers = rng.normal(size=(len(sizes), d)) * 2
    x = np.concatenate([ctr + spread * rng.normal(size=(s, d)) for ctr, s in zip(centers, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes), centers


_kstep = jax.jit(prototypes.kmeans_step)
_kmeans = jax.jit(prototypes.kmeans, static_argnames=("num_iters",))


def test_kmeans_step_and_iterations_match_numpy():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    valid = rng.random(40) < 0.8
    c0 = rng.normal(size=(4, 5)).astype(np.float32)
    c0[3] += 20.0  # an empty cluster keeps its centroid
    for _ in range(2):  # same shapes twice: one compilation
        new, counts = _kstep(x, c0, valid)
    want, want_counts = np_kmeans_step(x, c0, valid)
    np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, want_counts)
    assert want_counts[3] == 0
    want = c0
    for _ in range(3):
        want, want_counts = np_kmeans_step(x, want, valid)
    got, present = _kmeans(x, c0, valid, num_iters=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(present, want_counts > 0)
    assert not np.allclose(want, np_kmeans_step(x, c0, valid)[0])  # the iterations moved it
    assert _kstep._cache_size() == 1 and _kmeans._cache_size() == 1


def test_iph_warm_start_keeps_cluster_identity_and_loss_matches_numpy():
    rng = np.random.default_rng(8)
    x, y, centers = planted_blobs(rng, [14, 5, 9])
    valid = np.ones(len(x), bool)
    valid[-3:] = False
    k = 3
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    t_protos, t_present = prototypes.class_prototypes(x, y, valid, k)
    want_t = np.stack([xn[(y == j) & valid].mean(0) for j in range(k)])
    np.testing.assert_allclose(t_protos, want_t, rtol=1e-5, atol=1e-6)
    # First step: starts from the teacher prototypes, so cluster k = class k.
    state = prototypes.IPHState.init(k, x.shape[1])
    s_protos, s_present = prototypes.iph_student_prototypes(state, x, valid, t_protos, t_present)
    np.testing.assert_allclose(s_protos, want_t, rtol=1e-4, atol=1e-5)
    # Later steps warm-start from the stored centroids, not from the teacher.
    state = prototypes.iph_update(state, s_protos)
    shuffled = t_protos[jnp.array([2, 0, 1])]
    s2, _ = prototypes.iph_student_prototypes(state, x, valid, shuffled, t_present)
    np.testing.assert_allclose(s2, want_t, rtol=1e-4, atol=1e-5)
    # Loss: only clusters present on both sides (student misses 1, teacher misses 2).
    sp = rng.normal(size=(k, 6)).astype(np.float32)
    tp = rng.normal(size=(k, 6)).astype(np.float32)
    s_pres, t_pres = np.array([True, False, True]), np.array([True, True, False])
    cos = (sp[0] @ tp[0]) / np.linalg.norm(sp[0]) / np.linalg.norm(tp[0])
    np.testing.assert_allclose(prototypes.iph_loss(sp, s_pres, tp, t_pres), 1 - cos, rtol=1e-5)
    assert prototypes.iph_loss(sp, s_pres, tp, ~s_pres) == 0.0


def _iph_total(feats_s, feats_t, y, valid, state):
    t_protos, t_present = prototypes.class_prototypes(feats_t, y, valid, 3)
    s_protos, s_present = prototypes.iph_student_prototypes(state, feats_s, valid, t_protos,
                                                            t_present)
    return prototypes.iph_loss(s_protos, s_present, t_protos, t_present)


_iph_grad = jax.jit(jax.grad(_iph_total, argnums=(0, 1)))


def test_iph_gradients_reach_the_student_side_only():
    rng = np.random.default_rng(9)
    x, y, _ = planted_blobs(rng, [6, 4, 5])
    noisy = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
    valid = np.ones(len(x), bool)
    state = prototypes.iph_update(prototypes.IPHState.init(3, 6),
                                  prototypes.class_prototypes(x, y, valid, 3)[0])
    for _ in range(2):
        g_s, g_t = _iph_grad(noisy, x, y, valid, state)
    assert np.abs(np.asarray(g_s)).max() > 1e-4
    assert np.abs(np.asarray(g_t)).max() == 0.0
    assert _iph_grad._cache_size() == 1
