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


# ------------------------------------------------------------ one whole step, every algorithm
# The model's logits are a learnable table (row = the id written in the image's one pixel), so
# every gradient is visible: the labeled, weak and strong views of each sample are separate
# rows, and the step's gradient of each row is compared with a torch reference step written
# here from USB's train_step (FixMatch / FlexMatch / FreeMatch / SoftMatch / pseudo-label /
# mean teacher) and TEAR's DA queue. The reference sees the valid rows only (USB has no
# padding); the jaxmed batch also holds one padded unlabeled row, which must count nowhere.
torch = pytest.importorskip("torch")
import flax.linen as fnn  # noqa: E402
import optax  # noqa: E402

from jaxmed.data import augment  # noqa: E402
from jaxmed.methods.tear import algorithms  # noqa: E402
from jaxmed.methods.tear import step as ssl_step  # noqa: E402
from jaxmed.train.state import TrainState  # noqa: E402

TF = torch.nn.functional
C_T, NB, NU, ROWS, FD, SLOTS_T = 3, 4, 7, 18, 4, 30
ID_LB, ID_W, ID_S = np.arange(NB), NB + np.arange(NU), NB + NU + np.arange(NU)
Y_LB = np.array([2, 0, 1, 0])
U_INDEX = np.array([12, 5, 20, 7, 15, 23, 9], np.int32)  # stable indices (memories)
U_VALID = np.array([True] * (NU - 1) + [False])  # the last unlabeled row is padding
WEAK = np.array([[5.0, 0.0, -1.0],  # confident class 0 (p 0.991)
                 [0.2, 4.5, 0.0],  # confident class 1 (0.976)
                 [1.0, 0.8, 0.3],  # unsure class 0 (0.432): FreeMatch's old tau 0.40 < it < new
                 [0.0, 0.5, 3.4],  # class 2, 0.919: under FixMatch's 0.95
                 [-1.0, 3.2, 3.0],  # unsure class 1 (0.545)
                 [2.5, 0.5, 0.0],  # class 0, 0.821: FlexMatch's class-0 cutoff 0.79 -> 0.95
                 [9.0, 0.0, 0.0]], np.float32)  # padding: confident, must never count
_r = np.random.default_rng(21)
TABLE = np.concatenate([_r.normal(size=(NB, C_T)) * 2, WEAK,
                        _r.normal(size=(NU, C_T)) * 1.5]).astype(np.float32)
FEATS = _r.normal(size=(ROWS, FD)).astype(np.float32)
EMA_TABLE = (TABLE + _r.normal(size=TABLE.shape) * 0.7).astype(np.float32)  # a teacher apart
EMA_FEATS = (FEATS + _r.normal(size=FEATS.shape) * 0.5).astype(np.float32)
CENTROIDS = _r.normal(size=(C_T, FD)).astype(np.float32)  # IPH's warm start (last step's)
M_MEAN = float(np.mean(augment.IMAGENET_MEAN))
M_STD = float(np.mean(augment.IMAGENET_STD))


class TableModel(fnn.Module):
    """logits = table[id], features = feats[id], id = the uint8 value of the image's pixel
    (recovered from the ImageNet-normalised input)."""

    @fnn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        table = self.param("table", lambda k: jnp.asarray(TABLE))
        feats = self.param("feats", lambda k: jnp.asarray(FEATS))
        self.variable("batch_stats", "unused", lambda: jnp.zeros(()))
        ids = jnp.round((x[:, 0, 0, 0] * M_STD + M_MEAN) * 255.0).astype(jnp.int32)
        return (table[ids], feats[ids]) if features else table[ids]


def grad_capture():
    """An 'optimizer' that leaves the params unchanged and stores the gradient as its state."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def table_batch():
    img = lambda ids: np.asarray(ids, np.uint8).reshape(-1, 1, 1, 1)  # noqa: E731
    return {"labeled": {"image": img(ID_LB), "label": Y_LB.astype(np.int32),
                        "index": np.arange(NB, dtype=np.int32), "valid": np.ones(NB, bool)},
            "unlabeled": {"weak": img(ID_W), "strong": img(ID_S), "index": U_INDEX,
                          "valid": U_VALID}}


def planted_memory(name, mem):
    """Non-initial running state, so that masks / weights are partial."""
    if mem.flex is not None:  # 24 unlabeled slots (4..27): 10 picked class 0, 3 class 1
        sel = np.full(SLOTS_T, -1, np.int32)
        sel[[4, 6, 8, 10, 11, 13, 14, 16, 17, 18]] = 0
        sel[[19, 21, 22]] = 1
        mem = mem.replace(flex=mem.flex.replace(selected=jnp.asarray(sel)))
    if mem.free is not None:
        mem = mem.replace(free=th.FreeMatchState(
            time_p=jnp.asarray(0.4), p_model=jnp.asarray([0.5, 0.3, 0.2]),
            label_hist=jnp.asarray([0.55, 0.3, 0.15])))
    if mem.soft is not None:
        mem = mem.replace(soft=th.SoftMatchState(mu=jnp.asarray(0.8), var=jnp.asarray(0.02)))
    if mem.uniform is not None:
        mem = mem.replace(uniform=mem.uniform.replace(p_model=jnp.asarray([0.5, 0.35, 0.15]),
                                                      count=jnp.asarray(4, jnp.int32)))
    if mem.da is not None:
        q = np.zeros((32, C_T), np.float32)
        q[:3] = [[0.6, 0.3, 0.1], [0.5, 0.3, 0.2], [0.55, 0.25, 0.2]]
        mem = mem.replace(da=pl.DAQueue(means=jnp.asarray(q), count=jnp.asarray(3, jnp.int32)))
    if mem.teacher is not None:
        mem = mem.replace(teacher=teacher.EmaTeacher(
            params={"table": jnp.asarray(EMA_TABLE), "feats": jnp.asarray(EMA_FEATS)},
            batch_stats={"unused": jnp.zeros(())}))
    if mem.adapl is not None:  # slots 5 and 15 seen before, with their estimates
        est, seen = np.zeros(SLOTS_T, np.float32), np.zeros(SLOTS_T, bool)
        est[[5, 15]], seen[[5, 15]] = [0.3, 1.2], True
        mem = mem.replace(adapl=adapl.AdaPLMemory(estimate=jnp.asarray(est),
                                                  seen=jnp.asarray(seen)))
    if mem.iph is not None:
        mem = mem.replace(iph=prototypes.IPHState(centroids=jnp.asarray(CENTROIDS),
                                                  initialized=jnp.ones((), bool)))
    return mem


HP = ssl_step.Hyper(num_classes=C_T, total_steps=20, ema_p=0.9, teacher_momentum=0.8)
STEP0 = 3  # pseudo-label / mean teacher ramp: 3 / (0.4 * 20)


def jax_step(name):
    alg = algorithms.get(name)
    model = TableModel()
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 1, 1, 1), np.float32))
    tx = grad_capture()
    base = TrainState.create(variables, tx, jax.random.PRNGKey(1))
    mem = ssl_step.init_memory(alg, HP, params=base.params, batch_stats=base.batch_stats,
                               num_slots=SLOTS_T, num_unlabeled=24, feature_dim=FD)
    state = ssl_step.create_ssl_state(base, planted_memory(name, mem), SLOTS_T)
    state = state.replace(step=jnp.asarray(STEP0, jnp.int32))
    fn = ssl_step.make_ssl_step(model, tx, alg, HP)
    return state, jax.device_get(jax.jit(fn)(state, table_batch()))


def torch_reference_step(name, before):
    """USB's train_step of `name` on the valid rows, by torch autograd on the table."""
    t = torch.tensor(TABLE, dtype=torch.float64, requires_grad=True)
    f = torch.tensor(FEATS, dtype=torch.float64, requires_grad=True)
    v = U_VALID
    lb, w, s = t[ID_LB], t[ID_W[v]], t[ID_S[v]]
    sup = TF.cross_entropy(lb, torch.tensor(Y_LB))
    probs = torch.softmax(w.detach(), -1)
    mem = jax.device_get(before.ssl)
    new, extra = {}, {}
    m = HP.ema_p
    ramp = 1.0
    if name in ("fixmatch", "pseudo_label"):
        mask = (probs.max(-1).values >= 0.95).double()
        plab = probs.argmax(-1)
    elif name in ("fixmatch_da", "tear"):
        means, count = np.array(mem.da.means, np.float64), int(mem.da.count)
        means[count % 32] = probs.mean(0).numpy()
        aligned = probs / torch.tensor(means[:count + 1].mean(0))
        aligned = aligned / aligned.sum(-1, keepdim=True)
        mask = (aligned.max(-1).values >= 0.95).double()
        plab = aligned.argmax(-1)
        new["da_means"] = means
    elif name == "flexmatch":
        sel = np.array(mem.flex.selected)
        unl = np.arange(4, 28)  # USB's selected_label: one entry per unlabeled record
        counts = Counter(sel[unl].tolist())
        acc = torch.tensor([counts[c] / max(counts.values()) for c in range(C_T)])
        maxp, plab = probs.max(-1)
        mask = (maxp >= 0.95 * acc[plab] / (2 - acc[plab])).double()
        select = (maxp >= 0.95).numpy()
        sel[U_INDEX[v][select]] = plab.numpy()[select]
        new["selected"] = sel
    elif name == "freematch":
        maxp, plab = probs.max(-1)
        time_p = m * float(mem.free.time_p) + (1 - m) * maxp.mean()
        p_model = m * torch.tensor(np.array(mem.free.p_model), dtype=torch.float64) + (
            1 - m) * probs.mean(0)
        hist = torch.bincount(plab, minlength=C_T).double()
        label_hist = m * torch.tensor(np.array(mem.free.label_hist), dtype=torch.float64) + (
            1 - m) * hist / hist.sum()
        mask = (maxp >= time_p * (p_model / p_model.max())[plab]).double()
        new.update(time_p=time_p.item(), p_model=p_model.numpy(),
                   label_hist=label_hist.numpy())
    elif name == "softmatch":
        p_model = m * torch.tensor(np.array(mem.uniform.p_model), dtype=torch.float64) + (
            1 - m) * probs.mean(0)
        aligned = probs * (1 / C_T + 1e-6) / (p_model + 1e-6)
        aligned = aligned / aligned.sum(-1, keepdim=True)
        amax = aligned.max(-1).values
        mu = m * float(mem.soft.mu) + (1 - m) * amax.mean().item()
        var = m * float(mem.soft.var) + (1 - m) * amax.var(unbiased=True).item()
        mask = torch.exp(-torch.clamp(amax - mu, max=0.0) ** 2 / (2 * var / 4.0))
        plab = probs.argmax(-1)  # the raw weak logits' labels, not the aligned ones
        new.update(uniform=p_model.numpy(), mu=mu, var=var)
    if name == "mean_teacher":
        t_probs = torch.softmax(torch.tensor(EMA_TABLE[ID_W[v]], dtype=torch.float64), -1)
        mask = torch.ones(int(v.sum()), dtype=torch.float64)
        unsup = ((torch.softmax(s, -1) - t_probs) ** 2).mean(-1).mean()
        lam, ramp = 50.0, min(STEP0 / (0.4 * HP.total_steps), 1.0)
    else:
        logits_u = w if name == "pseudo_label" else s  # pseudo-label: the weak view on itself
        unsup = (TF.cross_entropy(logits_u, plab, reduction="none") * mask).mean()
        lam = 1.0
        if name == "pseudo_label":
            ramp = min(STEP0 / (0.4 * HP.total_steps), 1.0)
    total = sup + lam * ramp * unsup
    if name == "freematch" and mask.sum() > 0:  # USB's entropy_loss over the masked rows
        ps = torch.softmax(s[mask.bool()], -1)
        hs = torch.bincount(ps.argmax(-1), minlength=C_T).double()
        hs = hs / hs.sum()
        inv = lambda h: torch.where(h > 0, 1 / h, torch.zeros_like(h)).detach()  # noqa: E731
        mod_model = p_model * inv(label_hist)
        mod_model = mod_model / mod_model.sum()
        mod_mean = ps.mean(0) * inv(hs)
        mod_mean = mod_mean / mod_mean.sum()
        fair = (mod_model * torch.log(mod_mean + 1e-12)).sum()
        total = total + 0.001 * fair
        extra["fair_loss"] = fair.item()
    if name == "tear":  # + AdaPL (weight 0.1) + IPH (weight 0.1), TEAR's spec
        t_all = torch.softmax(torch.tensor(EMA_TABLE[np.r_[ID_LB, ID_W[v]]],
                                           dtype=torch.float64), -1)
        t_w = t_all[NB:]
        d = (t_w * torch.log(t_w / probs)).sum(-1)  # KL(teacher || student) of the weak view
        est, seen = np.array(mem.adapl.estimate, np.float64), np.array(mem.adapl.seen)
        idx = U_INDEX[v]
        d = torch.where(torch.tensor(seen[idx]), 0.9 * torch.tensor(est[idx]) + 0.1 * d, d)
        est[idx], seen[idx] = d.numpy(), True
        eps = torch.sigmoid(2.0 * d) - 0.5
        q = (1 - eps)[:, None] * TF.one_hot(plab, C_T) + eps[:, None] / C_T
        ad = (-(q * torch.log_softmax(s, -1)).sum(-1) * mask).mean()
        # IPH: teacher class means of its normalised features under its DA-aligned labels
        t_al = t_all / torch.tensor(means[:count + 1].mean(0))
        t_lab = t_al.argmax(-1)
        unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
        tf_ = unit(torch.tensor(EMA_FEATS[np.r_[ID_LB, ID_W[v]]], dtype=torch.float64))
        t_pres = torch.stack([(t_lab == k).any() for k in range(C_T)])
        zero = torch.zeros(FD, dtype=torch.float64)
        t_proto = torch.stack([tf_[t_lab == k].mean(0) if t_pres[k] else zero
                               for k in range(C_T)])
        sf = unit(f[ID_W[v]])  # the student's weak features, with gradient
        c = torch.tensor(CENTROIDS, dtype=torch.float64)  # warm start: last step's centroids
        for it in range(3):  # Lloyd: assignments frozen, the last means differentiable
            a = torch.cdist(sf.detach(), c).argmin(-1)
            feats_k = sf if it == 2 else sf.detach()
            c = torch.stack([feats_k[a == k].mean(0) if (a == k).any() else c[k]
                             for k in range(C_T)])
        s_pres = torch.stack([(a == k).any() for k in range(C_T)])
        both = (s_pres & t_pres).double()
        cos = (unit(c) * unit(t_proto + 1e-30)).sum(-1)
        ip = (both * (1 - cos)).sum() / both.sum().clamp(min=1)
        total = total + 0.1 * ad + 0.1 * ip
        extra.update(adapl_loss=ad.item(), iph_loss=ip.item())
        new.update(estimate=est, seen=seen, centroids=c.detach().numpy())
    total.backward()
    # USB's EMAHook after the optimizer step (params unchanged here): m_ema t + (1 - m_ema) p
    mt = HP.teacher_momentum
    new["teacher"] = mt * EMA_TABLE + (1 - mt) * TABLE
    return {"loss": total.item(), "sup_loss": sup.item(), "unsup_loss": unsup.item(),
            "mask_rate": mask.mean().item(), "grad": t.grad.numpy(), "mask": mask.numpy(),
            "grad_feats": np.zeros(FEATS.shape) if f.grad is None else f.grad.numpy(),
            **extra}, new


@pytest.mark.parametrize("name", ["fixmatch", "fixmatch_da", "flexmatch", "freematch",
                                  "softmatch", "pseudo_label", "mean_teacher", "tear"])
def test_one_ssl_step_matches_the_reference_step(name):
    before, (after, metrics) = jax_step(name)
    ref, new = torch_reference_step(name, before)
    assert 0 < ref["mask"].mean() < 1 or name == "mean_teacher", ref["mask"]  # partial
    for k in ("loss", "sup_loss", "unsup_loss", "mask_rate", "fair_loss", "adapl_loss",
              "iph_loss"):
        if k in ref:
            np.testing.assert_allclose(metrics[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=k)
    grad = after.opt_state["table"]  # the step's gradient (grad_capture)
    np.testing.assert_allclose(grad, ref["grad"], rtol=2e-5, atol=1e-6)
    g_weak = np.asarray(grad)[ID_W]
    if name == "pseudo_label":  # its loss is the weak view's: its rows move, the strong don't
        assert np.abs(g_weak[U_VALID]).max() > 1e-3
        assert np.all(np.asarray(grad)[ID_S] == 0)
    else:  # no gradient through the weak view (pseudo labels / masks / teacher targets)
        assert np.all(g_weak == 0)
    assert np.all(g_weak[~U_VALID] == 0) and np.all(np.asarray(grad)[ID_S][~U_VALID] == 0)
    np.testing.assert_allclose(after.opt_state["feats"], ref["grad_feats"], rtol=2e-5,
                               atol=1e-6)  # IPH's (TEAR): the student's weak features only
    if name != "tear":
        assert np.all(after.opt_state["feats"] == 0)
    mem = after.ssl
    np.testing.assert_allclose(mem.teacher.params["table"], new["teacher"], rtol=1e-6)
    if name == "tear":
        assert np.abs(ref["grad_feats"]).max() > 1e-4 and ref["iph_loss"] > 1e-3
        np.testing.assert_allclose(mem.adapl.estimate, new["estimate"], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(mem.adapl.seen, new["seen"])
        np.testing.assert_allclose(mem.iph.centroids, new["centroids"], rtol=1e-5, atol=1e-6)
    if name in ("fixmatch_da", "tear"):
        np.testing.assert_allclose(mem.da.means, new["da_means"], rtol=1e-6, atol=1e-7)
        assert int(mem.da.count) == 4
    if name == "flexmatch":
        np.testing.assert_array_equal(mem.flex.selected, new["selected"])
    if name == "freematch":
        np.testing.assert_allclose(
            [mem.free.time_p, *mem.free.p_model, *mem.free.label_hist],
            [new["time_p"], *new["p_model"], *new["label_hist"]], rtol=1e-6)
    if name == "softmatch":
        np.testing.assert_allclose(mem.uniform.p_model, new["uniform"], rtol=1e-6)
        np.testing.assert_allclose([mem.soft.mu, mem.soft.var], [new["mu"], new["var"]],
                                   rtol=1e-5)


def test_evaluation_uses_the_ema_params_and_reports_the_student_beside():
    """USB evaluates its EMA model: planted EMA and student tables differ, and the eval step's
    `probs` are the EMA's, `student_probs` the student's; eval_ema=False: the student's."""
    from jaxmed.methods.tear.run import ema_and_student_metrics

    state, _ = jax_step("fixmatch")  # the state before the step: EMA = EMA_TABLE (planted)
    ids = np.r_[ID_LB, ID_S]
    labels = EMA_TABLE[ids].argmax(-1).astype(np.int32)  # the EMA is right on every image
    batch = {"image": ids.astype(np.uint8).reshape(-1, 1, 1, 1), "label": labels,
             "valid": np.ones(len(ids), bool)}
    out = jax.device_get(jax.jit(ssl_step.make_eval_step(TableModel()))(state, batch))
    soft = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(out["probs"], soft(EMA_TABLE[ids]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["student_probs"], soft(TABLE[ids]), rtol=1e-5, atol=1e-7)
    p_ema = soft(EMA_TABLE[ids])
    np.testing.assert_allclose(out["loss"], -np.log(p_ema[np.arange(len(ids)), labels]),
                               rtol=1e-5)
    plain = jax.device_get(jax.jit(ssl_step.make_eval_step(TableModel(), eval_ema=False))(
        state, batch))
    np.testing.assert_allclose(plain["probs"], soft(TABLE[ids]), rtol=1e-5, atol=1e-7)
    assert "student_probs" not in plain
    m = ema_and_student_metrics(out, ("a", "b", "c"))
    acc = lambda p: float(np.mean(p.argmax(-1) == labels))  # noqa: E731
    assert m["accuracy"] == pytest.approx(acc(soft(EMA_TABLE[ids])))
    assert m["student/accuracy"] == pytest.approx(acc(soft(TABLE[ids])))
    assert m["accuracy"] == 1.0 and m["student/accuracy"] < 0.9  # the planted tables differ
    assert {"auc", "student/auc", "recall/a", "student/recall/a"} <= set(m)
    no_ema = ssl_step.init_memory(algorithms.get("fixmatch"), ssl_step.Hyper(
        num_classes=C_T, total_steps=20, eval_ema=False), params=state.params,
        batch_stats=state.batch_stats, num_slots=SLOTS_T, num_unlabeled=24, feature_dim=FD)
    assert no_ema.teacher is None  # fixmatch keeps no EMA when it is not evaluated
