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


# ------------------------------------------------------------------ MoCo v2 and DINOv2 teachers
def _calibrated_resnet50(seed=2):
    """A ResNet-50 whose BN running statistics are those of its own activations, with conv
    weights scaled down so the running variances are small (~1e-3), like real checkpoints:
    a wrong BN epsilon or a variance/std mix-up shows up."""
    torch.manual_seed(seed)
    net = ref.ResNet(ref.Bottleneck, (3, 4, 6, 3), 128)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: running stats = this batch's stats
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        net.train()(torch.randn(64, 3, 32, 32, generator=g))
    return net.eval()


def _torch_pooled(net, x):
    with torch.no_grad():
        t = torch.from_numpy(x.transpose(0, 3, 1, 2))
        t = torch.nn.functional.max_pool2d(torch.relu(net.bn1(net.conv1(t))), 3, 2, 1)
        for i in range(4):
            t = getattr(net, f"layer{i + 1}")(t)
        return t.mean((2, 3)).numpy()


def test_moco_v2_resnet50_checkpoint_matches_torch_features(tmp_path):
    """A MoCo v2 checkpoint as the official one is laid out: encoder_q (+ MLP head fc.0/fc.2),
    encoder_k, queue. The converted teacher's pooled 2048-d feature equals PyTorch's."""
    net = _calibrated_resnet50()
    variances = [m.running_var for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert max(float(v.median()) for v in variances) < 0.05  # small, as in real checkpoints
    body = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd = {f"module.encoder_q.{k}": v for k, v in body.items()}
    sd |= {f"module.encoder_k.{k}": v.clone() for k, v in body.items()}
    sd |= {"module.encoder_q.fc.0.weight": torch.randn(2048, 2048),
           "module.encoder_q.fc.0.bias": torch.randn(2048),
           "module.encoder_q.fc.2.weight": torch.randn(128, 2048),
           "module.encoder_q.fc.2.bias": torch.randn(128),
           "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1)}
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": sd}, path)

    bare = load_torch_checkpoint(str(path), "resnet50")  # no target: the MLP head is dropped
    assert not any(k.startswith(("fc", "encoder", "queue")) for k in bare["params"])
    assert "layer4_2" in bare["params"] and "fc" not in bare["params"]
    model = create_model("resnet50", 8)
    variables = load_torch_checkpoint(str(path), "resnet50", target=zeros_like_init(model, 32))
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    _, feats = jax.jit(lambda v, x: model.apply(v, x, features=True))(variables, x)
    want = _torch_pooled(net, x)
    scale = np.abs(want).max()
    assert feats.shape == (2, 2048) and scale > 0.1
    # 53 BN layers with variances ~1e-3 amplify float32 rounding: torch float32 itself is
    # ~5e-5 of the feature scale away from torch float64 here, so compare at that scale.
    np.testing.assert_allclose(np.asarray(feats) / scale, want / scale, atol=1e-4)


class _TorchDinoBlock(torch.nn.Module):
    """DINOv2's Block / MemEffAttention / Mlp / LayerScale with the official parameter names."""

    def __init__(self, dim, heads):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def attention(self, x):
        b, n, c = x.shape
        qkv = self.attn.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        x = x + self.ls1.gamma * self.attention(self.norm1(x))
        mlp = self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))
        return x + self.ls2.gamma * mlp


class _TorchDinoV2(torch.nn.Module):
    """DinoVisionTransformer's forward (prepare_tokens_with_masks, interpolate_pos_encoding with
    offset 0.1, bicubic, no antialias; x_norm_clstoken), random weights."""

    def __init__(self, dim, depth, heads, patch, grid):
        super().__init__()
        nn = torch.nn
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList([_TorchDinoBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(torch.rand(dim) + 0.5)
                    m.bias.copy_(torch.randn(dim) * 0.1)

    def interpolate_pos_encoding(self, x, w, h):
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        w0, h0, m, dim = w // self.patch, h // self.patch, int(n**0.5), x.shape[-1]
        pos = torch.nn.functional.interpolate(
            self.pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
            antialias=False, scale_factor=((w0 + 0.1) / m, (h0 + 0.1) / m))
        assert (w0, h0) == pos.shape[-2:]
        pos = pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], pos), dim=1)

    def forward(self, x):
        _, _, w, h = x.shape
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        t = t + self.interpolate_pos_encoding(t, w, h)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]


@pytest.fixture(scope="module")
def dinov2_small():
    """A 2-block ViT-S/14 (dim 384, 6 heads) whose checkpoint pos-embed grid is 3 x 3 (42 px)."""
    torch.manual_seed(3)
    net = _TorchDinoV2(384, 2, 6, 14, 3).eval()
    model = create_model("dinov2_vits14", 5, depth=2, pos_grid=3)
    target = zeros_like_init(model, 42)
    sd = dict(net.state_dict())
    assert "blocks.1.ls2.gamma" in sd and "mask_token" in sd  # the official key layout
    variables = convert_state_dict(sd, "dinov2_vits14", target=target)
    forward = jax.jit(lambda v, x: model.apply(v, x, features=True)[1])
    return net, variables, forward


@pytest.mark.parametrize("hw", [(42, 42), (28, 28), (56, 56), (28, 56)],
                         ids=["checkpoint-grid", "down", "up", "non-square"])
def test_dinov2_cls_feature_matches_torch(dinov2_small, hw):
    """Normed CLS token equal to the torch DINOv2 forward; every size but 42 px interpolates
    the 3 x 3 pos-embed grid (bicubic, DINOv2's 0.1 offset)."""
    net, variables, forward = dinov2_small
    x = np.random.default_rng(4).normal(size=(2, *hw, 3)).astype(np.float32)
    expected = _torch_forward(net, x)
    got = np.asarray(forward(variables, x))
    assert got.shape == (2, 384) and np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_dinov2_vitb_layout_and_conversion_errors():
    """ViT-B/14 converts into dinov2_vitb14 (depth 1 here); registers are refused by name."""
    torch.manual_seed(5)
    net = _TorchDinoV2(768, 1, 12, 14, 2).eval()
    model = create_model("dinov2_vitb14", 3, depth=1, pos_grid=2)
    variables = convert_state_dict(net.state_dict(), "dinov2_vitb14",
                                   target=zeros_like_init(model, 28))
    np.testing.assert_array_equal(variables["params"]["blocks_0"]["ls1"]["gamma"],
                                  net.blocks[0].ls1.gamma.detach().numpy())
    x = np.random.default_rng(5).normal(size=(1, 28, 28, 3)).astype(np.float32)
    got = model.apply(variables, x, features=True)[1]
    np.testing.assert_allclose(np.asarray(got), _torch_forward(net, x), atol=1e-4, rtol=1e-4)
    sd = dict(net.state_dict(), register_tokens=torch.zeros(1, 4, 768))
    with pytest.raises(ValueError, match="register_tokens"):
        convert_state_dict(sd, "dinov2_vitb14")
    small = create_model("dinov2_vitb14", 3, depth=1, pos_grid=3)  # other pos-embed grid
    with pytest.raises(ValueError, match="pos_embed"):
        convert_state_dict(net.state_dict(), "dinov2_vitb14", target=zeros_like_init(small, 28))
