"""Converted PyTorch weights reproduce a PyTorch forward pass (random weights, eval mode)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxmed.models import create_model  # noqa: E402
from jaxmed.models.convert import convert_state_dict, load_torch_checkpoint  # noqa: E402
from tests import torch_reference as ref  # noqa: E402

CASES = {
    "resnet18": (lambda: ref.ResNet(ref.BasicBlock, (2, 2, 2, 2), 7), 64),
    "resnet50": (lambda: ref.ResNet(ref.Bottleneck, (3, 4, 6, 3), 7), 64),
    "densenet121": (lambda: ref.DenseNet121(7), 64),
    "alexnet": (lambda: ref.AlexNet(7), 96),
}


def zeros_like_init(model, size):
    """The variables tree of `model` (zeros), traced rather than computed."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _torch_forward(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


@pytest.mark.parametrize("arch", sorted(CASES))
def test_converted_forward_matches_torch(arch):
    build, size = CASES[arch]
    torch.manual_seed(0)
    net = ref.randomize_bn(build()).eval()
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    expected = _torch_forward(net, x)
    model = create_model(arch, 7)
    variables = convert_state_dict(net.state_dict(), arch, target=zeros_like_init(model, size))
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    assert np.abs(expected).max() > 1e-3  # not a degenerate comparison
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_moco_prefix_and_new_head(tmp_path):
    """MoCo's `module.encoder_q.` keys and MLP head load into a model with a new head."""
    torch.manual_seed(1)
    net = ref.randomize_bn(ref.ResNet(ref.BasicBlock, (2, 2, 2, 2), 128)).eval()
    sd = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc")}
    sd["module.encoder_q.fc.0.weight"] = torch.randn(512, 512)
    sd["module.encoder_q.fc.0.bias"] = torch.randn(512)
    sd["module.encoder_q.fc.2.weight"] = torch.randn(128, 512)
    sd["module.encoder_q.fc.2.bias"] = torch.randn(128)
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": sd, "epoch": 800}, path)
    model = create_model("resnet18", 5)
    init = zeros_like_init(model, 32)
    variables = load_torch_checkpoint(str(path), "resnet18", target=init)
    assert variables["params"]["fc"]["kernel"] is init["params"]["fc"]["kernel"]  # new head kept
    np.testing.assert_allclose(variables["params"]["layer2_0"]["conv1"]["kernel"],
                               net.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    _, feats = jax.jit(lambda v, x: model.apply(v, x, features=True))(variables, x)
    with torch.no_grad():
        t = torch.from_numpy(x.transpose(0, 3, 1, 2))
        t = torch.nn.functional.max_pool2d(torch.relu(net.bn1(net.conv1(t))), 3, 2, 1)
        for i in range(4):
            t = getattr(net, f"layer{i + 1}")(t)
        tf = t.mean((2, 3)).numpy()
    np.testing.assert_allclose(np.asarray(feats), tf, atol=1e-4)


def test_mismatched_checkpoint_names_the_keys():
    net = ref.ResNet(ref.BasicBlock, (2, 2, 2, 2), 7)
    init = zeros_like_init(create_model("resnet50", 7), 32)
    with pytest.raises(ValueError, match="layer1_0/conv1/kernel"):
        convert_state_dict(net.state_dict(), "resnet50", target=init)
