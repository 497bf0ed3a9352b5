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
