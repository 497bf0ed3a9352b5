"""FoPro-KD objectives against numpy references (asymmetric class counts, a tiny teacher)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import fourier
from jaxmed.methods.fopro_kd import heads, objectives

RNG = np.random.default_rng(0)
B, C, D, H, W = 6, 4, 5, 8, 8
COUNTS = np.array([300, 60, 9, 2])
LABELS = np.array([0, 0, 1, 2, 3, 3])
IMAGES = RNG.normal(size=(B, H, W, 3)).astype(np.float32)
TEACHER = {"w": RNG.normal(size=(H * W * 3, D)).astype(np.float32) * 0.1}


def teacher_apply(variables, x):
    """A small non-linear frozen 'teacher': tanh(flatten(x) @ w)."""
    return jnp.tanh(x.reshape(x.shape[0], -1) @ variables["w"])


def np_teacher(x):
    return np.tanh(x.reshape(len(x), -1) @ TEACHER["w"])


def np_bsm(logits, y, counts):
    z = logits + np.log(counts / counts.sum())
    z = z - z.max(1, keepdims=True)
    return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))


def np_cos_kd(a, b):
    return 2 - 2 * (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def np_prompt(log_mask, x):
    f = np.fft.rfft2(x.astype(np.float64), axes=(1, 2))
    raw = np.fft.irfft2(np.abs(f) * np.exp(log_mask) * np.exp(1j * np.angle(f)),
                        s=x.shape[1:3], axes=(1, 2))
    mu, sd = raw.mean((1, 2), keepdims=True), raw.std((1, 2), keepdims=True)
    return (raw - mu) / sd * x.std((1, 2), keepdims=True) + x.mean((1, 2), keepdims=True)


def _student():
    return {"logits": RNG.normal(size=(B, C)).astype(np.float32) * 2,
            "proj": RNG.normal(size=(B, D)).astype(np.float32),
            "proj_logits": RNG.normal(size=(B, C)).astype(np.float32)}


def _prompt(seed=1):
    # Column 0 / W/2 symmetric in k_y so the numpy reference needs no pair averaging.
    m = np.random.default_rng(seed).normal(size=(H, W // 2 + 1, 3)).astype(np.float32) * 0.5
    for col in (0, W // 2):
        m[:, col] = 0.5 * (m[:, col] + m[(-np.arange(H)) % H, col])
    return {"log_mask": jnp.asarray(m)}


def test_ekd_loss_matches_numpy_reference():
    student, teacher = _student(), RNG.normal(size=(B, D)).astype(np.float32)
    loss, parts = jax.jit(functools.partial(objectives.ekd_loss, class_counts=COUNTS))(
        student, LABELS, teacher)
    sup = np_bsm(student["logits"], LABELS, COUNTS).mean()
    sup_p = np_bsm(student["proj_logits"], LABELS, COUNTS).mean()
    kd = np_cos_kd(student["proj"], teacher).mean()
    np.testing.assert_allclose(loss, sup + sup_p + 3.0 * kd, rtol=1e-5)
    np.testing.assert_allclose([parts["loss_sup"], parts["loss_sup_proj"], parts["loss_kd"]],
                               [sup, sup_p, kd], rtol=1e-5)
    # per-class weights on the KD term (Fed-MAS balanced_free), then the batch mean
    w = np.array([0.1, 0.5, 1.0, 2.4], np.float32)
    _, parts_w = objectives.ekd_loss(student, LABELS, teacher, COUNTS, w_kd=1.5,
                                     kd_class_weights=w)
    np.testing.assert_allclose(parts_w["loss_kd"],
                               (w[LABELS] * np_cos_kd(student["proj"], teacher)).mean(),
                               rtol=1e-5)


def test_ekd_gradient_never_reaches_the_teacher_features():
    student, teacher = _student(), jnp.asarray(RNG.normal(size=(B, D)), jnp.float32)
    g_student, g_teacher = jax.grad(
        lambda s, t: objectives.ekd_loss(s, LABELS, t, COUNTS)[0], argnums=(0, 1))(student,
                                                                                  teacher)
    assert np.all(np.asarray(g_teacher) == 0)
    assert all(np.abs(np.asarray(g)).max() > 1e-4 for g in g_student.values())


def test_teacher_features_of_identity_prompt_are_the_clean_features():
    clean = objectives.teacher_features(None, TEACHER, IMAGES, teacher_apply=teacher_apply)
    np.testing.assert_allclose(clean, np_teacher(IMAGES), rtol=1e-5, atol=1e-6)
    ident = objectives.teacher_features(fourier.init_prompt(H, W, 3), TEACHER, IMAGES,
                                        teacher_apply=teacher_apply)
    np.testing.assert_allclose(ident, clean, atol=1e-5)


def test_fpg_discriminative_matches_numpy_and_trains_prompt_and_probe_only():
    probe = {"kernel": jnp.asarray(RNG.normal(size=(D, C)), jnp.float32),
             "bias": jnp.asarray(RNG.normal(size=(C,)), jnp.float32)}
    trainable = {"prompt": _prompt(), "probe": probe}
    batch = {"image": IMAGES, "label": LABELS}
    fn = jax.jit(functools.partial(objectives.fpg_discriminative_loss,
                                   teacher_apply=teacher_apply, class_counts=COUNTS))
    loss, metrics = fn(trainable, TEACHER, batch)
    feats = np_teacher(np_prompt(np.asarray(trainable["prompt"]["log_mask"]), IMAGES))
    logits = feats @ np.asarray(probe["kernel"]) + np.asarray(probe["bias"])
    np.testing.assert_allclose(loss, np_bsm(logits, LABELS, COUNTS).mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["fpg_accuracy"], (logits.argmax(1) == LABELS).mean())
    g_train, g_teacher = jax.grad(lambda tr, te: fn(tr, te, batch)[0], argnums=(0, 1))(
        trainable, TEACHER)
    assert np.all(np.asarray(g_teacher["w"]) == 0)  # the teacher stays frozen
    assert np.abs(np.asarray(g_train["prompt"]["log_mask"])).max() > 1e-4
    assert np.abs(np.asarray(g_train["probe"]["kernel"])).max() > 1e-4


def test_fpg_adversarial_matches_numpy_and_its_step_increases_distillation_loss():
    window = fourier.low_frequency_window(H, W, 0.5)
    student_proj = jnp.asarray(RNG.normal(size=(B, D)), jnp.float32)
    batch = {"image": IMAGES, "label": LABELS}
    prompt = _prompt(seed=2)
    fn = jax.jit(functools.partial(objectives.fpg_adversarial_loss, teacher_apply=teacher_apply,
                                   penalty=0.3, window=window))
    loss, metrics = fn(prompt, TEACHER, student_proj, batch)
    log_mask = np.where(window[:, :, None], np.asarray(prompt["log_mask"]), 0.0)
    kd = np_cos_kd(np.asarray(student_proj), np_teacher(np_prompt(log_mask, IMAGES))).mean()
    w3 = np.broadcast_to(window[:, :, None], log_mask.shape)
    reg = ((np.exp(log_mask) - 1) ** 2)[w3].mean()
    np.testing.assert_allclose([metrics["fpg_kd"], metrics["fpg_penalty"]], [kd, reg],
                               rtol=1e-4)
    np.testing.assert_allclose(loss, -kd + 0.3 * reg, rtol=1e-4)

    grads = jax.grad(lambda p, t, s: fn(p, t, s, batch)[0], argnums=(0, 1, 2))(
        prompt, TEACHER, student_proj)
    g_prompt, g_teacher, g_student = grads
    assert np.all(np.asarray(g_teacher["w"]) == 0) and np.all(np.asarray(g_student) == 0)
    assert np.all(np.asarray(g_prompt["log_mask"])[~window] == 0)  # only the window learns
    # one descent step of the prompt (no penalty) makes the teacher harder to distil
    no_pen = functools.partial(objectives.fpg_adversarial_loss, teacher_apply=teacher_apply,
                               penalty=0.0, window=window)
    g = jax.grad(lambda p: no_pen(p, TEACHER, student_proj, batch)[0])(prompt)
    stepped = jax.tree.map(lambda p, d: p - 0.05 * d, prompt, g)
    kd_after = no_pen(stepped, TEACHER, student_proj, batch)[1]["fpg_kd"]
    assert float(kd_after) > float(metrics["fpg_kd"]) + 1e-4


def test_projector_heads_match_torch_sequential():
    torch = pytest.importorskip("torch")
    model = heads.ProjectorHeads(teacher_dim=D, num_classes=C, hidden=7)
    h = RNG.normal(size=(B, 9)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), h)
    out, updates = model.apply(variables, h, train=True, mutable=["batch_stats"])
    p = variables["params"]
    t = lambda a: torch.tensor(np.asarray(a).T.copy())
    seq = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(),
                              torch.nn.Linear(7, D))
    fc_p = torch.nn.Linear(D, C)
    with torch.no_grad():
        for i, name in ((0, "p_0"), (3, "p_3")):
            seq[i].weight.copy_(t(p[name]["kernel"]))
            seq[i].bias.copy_(torch.tensor(np.asarray(p[name]["bias"])))
        fc_p.weight.copy_(t(p["fc_p"]["kernel"]))
        fc_p.bias.copy_(torch.tensor(np.asarray(p["fc_p"]["bias"])))
        proj = seq.train()(torch.tensor(h))
    np.testing.assert_allclose(out["proj"], proj.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["proj_logits"], fc_p(proj).detach().numpy(), atol=1e-5)
    # running mean as torch (momentum 0.1); flax's running var uses the biased batch variance
    # where torch uses the unbiased one (a property of models.common.batch_norm)
    np.testing.assert_allclose(updates["batch_stats"]["p_1"]["mean"],
                               seq[1].running_mean.numpy(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------ the references' DRW phase, reductions, ramp
import flax.linen as fnn  # noqa: E402
import optax  # noqa: E402

from jaxmed.methods.fopro_kd import step  # noqa: E402
from jaxmed.train.run import Durations  # noqa: E402

torch = pytest.importorskip("torch")
TF = torch.nn.functional
LT_COUNTS = np.array([300, 60, 9, 2])


def np_effective_number(counts, beta=0.9999):
    w = (1 - beta) / (1 - beta ** np.asarray(counts, np.float64))
    return (w / w.sum() * len(counts)).astype(np.float32)


def torch_ldam(logits, labels, counts, weight=None, s=30.0):
    """LDAM-DRW's LDAMLoss.forward (Fed-MAS's the same): CE(s (x - m_y 1_y), weight=w)."""
    m = 1.0 / np.sqrt(np.sqrt(counts))
    m = m * (0.5 / m.max())
    x, y = torch.tensor(logits), torch.tensor(np.asarray(labels, np.int64))
    onehot = TF.one_hot(y, x.shape[1]).bool()
    out = torch.where(onehot, x - torch.tensor(m, dtype=x.dtype)[y][:, None], x)
    w = None if weight is None else torch.tensor(weight)
    return TF.cross_entropy(s * out, y, weight=w).item()


def fedmas_drw_weights(counts, epoch, total_epochs):
    """Fed-MAS's LDAMLoss / BalancedSupByolLoss.set_weight(round): betas [0, 0.9999][epoch //
    int(0.8 * epochs)], ones in the first phase."""
    beta = [0.0, 0.9999][epoch // int(total_epochs * 0.8)]
    w = (1.0 - beta) / (1.0 - beta ** np.asarray(counts, np.float64))
    return (w / w.sum() * len(counts)).astype(np.float32)


def test_drw_start_is_the_references_epoch_boundary():
    for spe, epochs in ((5, 9), (5, 10), (3, 7), (2, 200), (4, 13)):
        d = Durations(spe, spe * epochs)
        start = step.drw_start_step(d, 0.8)
        assert start % spe == 0
        first_drw = min(e for e in range(epochs)
                        if fedmas_drw_weights(LT_COUNTS, e, epochs)[0] != 1.0)
        assert start == first_drw * spe, (spe, epochs)
    assert step.drw_start_step(Durations(5, 45), 0.8) == 35  # epoch 7 of 9, not step 36
    assert step.drw_start_step(Durations(5, 47), 0.8) == 35  # 9.4 epochs (train.steps)
    assert step.drw_start_step(Durations(5, 45), 1.0) == 45  # never
    assert step.drw_start_step(Durations(5, 45), 0.0) == 0


class TinyBackbone(fnn.Module):
    """features h = tanh(flatten(x) W), logits = h @ fc (LDAM's cosine logits use fc)."""

    @fnn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        self.variable("batch_stats", "unused", lambda: jnp.zeros(()))
        h = jnp.tanh(fnn.Dense(6, name="hidden")(x.reshape(x.shape[0], -1)))
        logits = fnn.Dense(4, use_bias=False, name="fc")(h)
        return (logits, h) if features else logits


def test_ldam_drw_step_switches_on_the_epoch_and_reduces_as_torch():
    """9 epochs of 5 steps: step 34 (epoch 6) trains with ones, step 35 (epoch 7) with the
    effective-number weights, and the batch loss is torch's weighted CE of the margined cosine
    logits, sum(w_y l) / sum(w_y), padded rows counting nowhere."""
    d = Durations(5, 45)
    model = TinyBackbone()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (8, 2, 2, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 0], np.int32)
    valid = np.array([True] * 7 + [False])
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 2, 2, 3), np.float32))
    tx = optax.sgd(0.0)
    setup = step.Setup("ldam_drw", model, None, tx, LT_COUNTS, ldam_scale=30.0,
                       drw_start=step.drw_start_step(d, 0.8))
    params = {"student": {"backbone": variables["params"]}}
    state = step.KDState(step=jnp.asarray(0, jnp.int32), params=params,
                         batch_stats={"backbone": variables["batch_stats"]},
                         opt_state={"student": tx.init(params["student"])},
                         rng=jax.random.PRNGKey(1))
    batch = {"image": images, "label": labels, "valid": valid}
    train = jax.jit(functools.partial(step.train_step, setup=setup))
    # the cosine logits the step trains on, for the torch reference
    from jaxmed.data import augment
    _, h = model.apply(variables, augment.normalize(images), features=True)
    z = np.asarray(step.cosine_logits(h, variables["params"]))[valid]
    y = labels[valid]
    got = {}
    for s_ in (34, 35, 44):
        _, m = train(state.replace(step=jnp.asarray(s_, jnp.int32)), {}, batch)
        got[s_] = float(m["loss_sup"])
        w = fedmas_drw_weights(LT_COUNTS, s_ // 5, 9)
        assert got[s_] == pytest.approx(torch_ldam(z, y, LT_COUNTS, weight=w), rel=1e-5), s_
    assert got[34] == pytest.approx(torch_ldam(z, y, LT_COUNTS), rel=1e-5)  # ones: plain CE
    assert abs(got[35] - got[34]) > 0.05 * got[34]  # the loss weights differ after the switch
    assert got[35] == got[44]


def _ekd_out(rng, b=6):
    return {"logits": jnp.asarray(rng.normal(size=(b, C)) * 2, jnp.float32),
            "proj": jnp.asarray(rng.normal(size=(b, D)), jnp.float32),
            "proj_logits": jnp.asarray(rng.normal(size=(b, C)), jnp.float32)}


def test_kd_class_weights_follow_the_drw_schedule():
    """Fed-MAS balanced_free: ones until the DRW epoch, then effective-number weights on the
    KD term, reduced as its BalancedSupByolLoss(...).mean() (batch mean of w_y kd)."""
    rng = np.random.default_rng(4)
    out, t = _ekd_out(rng), jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    cb = np_effective_number(COUNTS)
    d = Durations(5, 45)
    setup = step.Setup("ekd", None, None, None, COUNTS, kd_class_weights=cb,
                       drw_start=step.drw_start_step(d, 0.8))
    kd = np_cos_kd(np.asarray(out["proj"]), np.asarray(t))
    for s_ in (0, 34, 35, 40):
        _, parts = step.per_sample_loss(setup, out, LABELS, s_, t_feats=t)
        w = fedmas_drw_weights(COUNTS, s_ // 5, 9)
        np.testing.assert_allclose(float(jnp.mean(parts["loss_kd"])),
                                   np.mean(w[LABELS] * kd), rtol=1e-5)
    before = step.per_sample_loss(setup, out, LABELS, 34, t_feats=t)[1]["loss_kd"]
    after = step.per_sample_loss(setup, out, LABELS, 35, t_feats=t)[1]["loss_kd"]
    np.testing.assert_allclose(before, kd, rtol=1e-5)
    assert not np.allclose(before, after)


def fedmas_lrd(round_, rounds, start):
    """Fed-MAS --LRD: ramp_down = 1 - LinearRampUp(rounds - start)(round - start) from
    round start on (LinearRampUp(length)(x) = min(x / length, 1))."""
    if round_ < start:
        return 1.0
    return 1.0 - min((round_ - start) / (rounds - start), 1.0)


def test_w_kd_ramp_down_is_fedmas_lrd_per_epoch():
    for spe, epochs, f in ((4, 10, 0.3), (3, 9, 0.3), (2, 20, 0.5)):
        d = Durations(spe, spe * epochs)
        setup = step.Setup("ekd", None, None, None, COUNTS, w_kd=3.0, w_kd_ramp=f,
                           durations=d)
        got = np.array([float(step.w_kd_at(setup, s_)) for s_ in range(d.total)])
        want = np.array([3.0 * fedmas_lrd(s_ // spe, epochs, int(f * epochs))
                         for s_ in range(d.total)])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert got[0] == 3.0 and got[-1] < 3.0 and np.all(np.diff(got) <= 0)
    flat = step.Setup("ekd", None, None, None, COUNTS, w_kd=3.0)  # default off: constant
    assert float(step.w_kd_at(flat, 10 ** 6)) == 3.0
    # the EKD step's loss uses the ramped weight
    d = Durations(4, 40)
    setup = step.Setup("ekd", None, None, None, COUNTS, w_kd=3.0, w_kd_ramp=0.3, durations=d)
    rng = np.random.default_rng(5)
    out, t = _ekd_out(rng), jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    per, parts = step.per_sample_loss(setup, out, LABELS, 30, t_feats=t)  # epoch 7: 3 * 3/7
    np.testing.assert_allclose(
        per, parts["loss_sup"] + parts["loss_sup_proj"] + 3.0 * (3 / 7) * parts["loss_kd"],
        rtol=1e-5)


def test_setup_refuses_a_bad_ramp_or_reduction():
    from jaxmed.methods import fopro_kd

    kd = fopro_kd.default_config().kd
    kw = dict(method="ekd", model=None, heads=None, tx=None, class_counts=COUNTS,
              drw_start=0, kd_class_weights=None, durations=Durations(2, 10))
    with kd.unlocked():
        kd.w_kd_ramp = 1.5
    with pytest.raises(ValueError, match="config.kd.w_kd_ramp=1.5"):
        step.Setup.from_config(kd, **kw)
    kd.w_kd_ramp, kd.cb_reduction = 0.0, "sum"
    with pytest.raises(ValueError, match="config.kd.cb_reduction='sum'"):
        step.Setup.from_config(kd, **kw)


def test_class_balanced_reductions():
    """'weighted': torch's CrossEntropyLoss(weight=w) (Fed-MAS CB); 'mean': Cui's mean(w_y l)."""
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(B, C)).astype(np.float32) * 2
    w = np_effective_number(COUNTS)
    torch_cb = TF.cross_entropy(torch.tensor(logits), torch.tensor(LABELS),
                                weight=torch.tensor(w)).item()
    weighted = step.Setup("class_balanced", None, None, None, COUNTS)
    per, _ = step.per_sample_loss(weighted, {"logits": jnp.asarray(logits)}, LABELS, 0)
    assert float(jnp.mean(per)) == pytest.approx(torch_cb, rel=1e-5)
    cui = step.Setup("class_balanced", None, None, None, COUNTS, cb_reduction="mean")
    per, _ = step.per_sample_loss(cui, {"logits": jnp.asarray(logits)}, LABELS, 0)
    ce = -np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[np.arange(B), LABELS]
    assert float(jnp.mean(per)) == pytest.approx(np.mean(w[LABELS] * ce), rel=1e-5)


def test_balanced_kd_method_is_bsm_plus_the_class_balanced_kd_term():
    assert "balanced_kd" in step.METHODS and "balanced_kd" in step.LOGIT_KD
    assert "balanced_kd" not in step.STUDENT_ONLY
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(B, C)) * 2, jnp.float32)
    t_logits = jnp.asarray(rng.normal(size=(B, C)) * 3, jnp.float32)
    setup = step.Setup("balanced_kd", None, None, None, COUNTS, w_hinton=0.7, temperature=3.0)
    per, parts = step.per_sample_loss(setup, {"logits": logits}, LABELS, 0, t_logits=t_logits)
    w = np_effective_number(COUNTS)
    p = np.exp(np.asarray(t_logits) / 3)
    q = p * w / (p * w).sum(1, keepdims=True)
    logp = np.asarray(jax.nn.log_softmax(logits / 3))
    bkd = 9.0 * (q * (np.log(q) - logp)).sum(1)
    np.testing.assert_allclose(parts["loss_kd"], bkd, rtol=1e-5)
    np.testing.assert_allclose(parts["loss_sup"], np_bsm(np.asarray(logits), LABELS, COUNTS),
                               rtol=1e-5)
    np.testing.assert_allclose(per, parts["loss_sup"] + 0.7 * bkd, rtol=1e-5)
    hinton = step.per_sample_loss(step.Setup("hinton_kd", None, None, None, COUNTS,
                                             w_hinton=0.7, temperature=3.0),
                                  {"logits": logits}, LABELS, 0, t_logits=t_logits)[1]
    assert not np.allclose(hinton["loss_kd"], parts["loss_kd"])  # the weights act
