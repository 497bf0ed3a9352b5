"""Fidelity to the references where a whole run (not one loss) decides it: TEAR's run evaluates
the EMA model and streams the labeled images as unlabeled ones (USB's conventions), and
DenseNet-121's BatchNorm (epsilon included) computes what torch's BatchNorm2d does."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.config_check import sibling
from jaxmed.data.sources import record_indices
from jaxmed.train import sharding
from tests.conftest import REPO

QUICK = sibling(os.path.join(REPO, "configs", "tear", "x.py"), "quick")


def _tiny(**ssl):
    c = QUICK.get_config("tiny")
    c.ssl.update(ssl)
    return c


def test_ssl_run_evaluates_the_ema_and_streams_labeled_images_as_unlabeled():
    from jaxmed.methods.tear.run import build_ssl_run

    run = build_ssl_run(_tiny(), "flexmatch", 0)
    lab, unl, stream_u = (run.extras[k] for k in ("labeled", "unlabeled", "unlabeled_stream"))
    # USB's include_lb_to_ulb: the stream draws [labeled, unlabeled]; extras['unlabeled'] is
    # still the unlabeled set alone (HTL identifies among it)
    assert len(stream_u) == len(lab) + len(unl) and len(unl) == 84 and len(lab) == 12
    assert int(run.state.ssl.flex.num_unlabeled) == len(stream_u)  # USB's ulb_dest_len
    assert run.durations.steps_per_epoch == len(stream_u) // (2 * 8)  # one pass of the stream
    seen = set()
    stream = run.make_stream()
    for _ in range(run.durations.steps_per_epoch):  # one epoch of the unlabeled stream
        u = next(stream)["unlabeled"]
        seen |= set(np.asarray(u["index"])[np.asarray(u["valid"])].tolist())
    assert set(record_indices(lab).tolist()) <= seen  # labeled images in the unlabeled stream
    # EMA evaluation: plant an EMA whose every parameter is 0 (uniform outputs, CE = log C)
    state = jax.device_get(run.state)
    zero = jax.tree.map(np.zeros_like, state.ssl.teacher.params)
    planted = state.replace(ssl=state.ssl.replace(teacher=state.ssl.teacher.replace(
        params=zero)))
    planted = jax.device_put(planted, sharding.replicated(run.mesh))
    m = run.evaluate(planted, "val")
    assert m["loss"] == pytest.approx(np.log(3), rel=1e-5)  # the EMA's: uniform
    assert abs(m["student/loss"] - np.log(3)) > 1e-3  # the student's own, beside it
    assert {"auc", "student/auc", "accuracy", "student/accuracy"} <= set(m)

    off = build_ssl_run(_tiny(include_labeled_in_unlabeled=False, eval_ema=False), "fixmatch", 0)
    assert off.extras["unlabeled_stream"] is off.extras["unlabeled"]
    assert off.state.ssl.teacher is None  # fixmatch keeps no EMA it does not evaluate
    assert off.durations.steps_per_epoch == len(off.extras["unlabeled"]) // (2 * 8)


# ------------------------------------------------------------------ DenseNet-121 BatchNorm
def _torch_dense_layer(torch, cin, growth, bn_size):
    nn, F = torch.nn, torch.nn.functional

    class DenseLayer(nn.Module):  # torchvision's _DenseLayer (eval / train), eps 1e-5
        def __init__(self):
            super().__init__()
            self.norm1 = nn.BatchNorm2d(cin, eps=1e-5, momentum=0.1)
            self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth, eps=1e-5, momentum=0.1)
            self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

        def forward(self, x):
            y = self.conv1(F.relu(self.norm1(x)))
            return torch.cat([x, self.conv2(F.relu(self.norm2(y)))], 1)

    return DenseLayer()


def test_densenet_layer_batchnorm_matches_torch_including_epsilon():
    """jaxmed's DenseNet layer (norm1 -> relu -> conv1 -> norm2 -> relu -> conv2, concat) with
    torch's weights: eval mode with running variances of 1e-6..1e-4 (where eps = 1e-5 is most
    of the denominator: eps 1e-3 or flax's 1e-6 would be far off), and train mode (batch
    statistics) with the running statistics' update (momentum 0.1)."""
    torch = pytest.importorskip("torch")
    from jaxmed.models.densenet import DenseLayer

    cin, growth, bn_size = 5, 3, 2
    net = _torch_dense_layer(torch, cin, growth, bn_size)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (net.norm1, net.norm2):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.01)
            bn.running_var.copy_(10 ** (-6 + 2 * torch.rand(n, generator=g)))  # 1e-6 .. 1e-4
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4, 6, 6, cin)) * 0.01).astype(np.float32)  # ~ the running scale
    layer = DenseLayer(growth=growth, bn_size=bn_size, dtype=jnp.float32)
    shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x, train=False))  # layout

    def bn_vars(bn):
        return ({"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()},
                {"mean": bn.running_mean.numpy().copy(), "var": bn.running_var.numpy().copy()})

    conv = lambda m: {"kernel": m.weight.detach().numpy().transpose(2, 3, 1, 0)}  # noqa: E731
    (p1, s1), (p2, s2) = bn_vars(net.norm1), bn_vars(net.norm2)
    variables = {"params": {"norm1": p1, "conv1": conv(net.conv1), "norm2": p2,
                            "conv2": conv(net.conv2)},
                 "batch_stats": {"norm1": s1, "norm2": s2}}
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), shapes,
                 jax.tree.map(np.asarray, variables))
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        want = net.eval()(to_t(x)).numpy().transpose(0, 2, 3, 1)
    got = jax.jit(lambda v, x: layer.apply(v, x, train=False))(variables, x)
    assert np.abs(want[..., cin:]).max() > 1.0  # eps matters: outputs far from the input's 1e-2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # train mode: batch statistics, then the running mean's update as torch's
    with torch.no_grad():
        want_t = net.train()(to_t(x)).numpy().transpose(0, 2, 3, 1)
    got_t, upd = jax.jit(lambda v, x: layer.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    np.testing.assert_allclose(np.asarray(got_t), want_t, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["norm1"]["mean"],
                               net.norm1.running_mean.numpy(), rtol=1e-5, atol=1e-8)
