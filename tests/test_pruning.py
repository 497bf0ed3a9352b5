"""Pruning library: torch parity of global L1 masks, masked optimizers, compaction, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmed.models import create_model
from jaxmed.models.convert import convert_state_dict
from jaxmed.pruning import criteria, masks as M, schedules, structured as S

torch = pytest.importorskip("torch")
from torch.nn.utils import prune  # noqa: E402

from tests import torch_reference as ref  # noqa: E402


def torch_net(round_to=None):
    torch.manual_seed(0)
    net = ref.ResNet(ref.BasicBlock, (2, 2, 2, 2), 10)
    if round_to is not None:  # many exact ties
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.round(p * round_to) / round_to)
    return net


def prunable(net):
    return [(m, "weight") for m in net.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def torch_masks(net, amount):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    prune.global_unstructured(prunable(net), pruning_method=prune.L1Unstructured, amount=amount)
    out = {name: mod.weight_mask.detach().numpy().astype(bool)
           for name, mod in net.named_modules() if hasattr(mod, "weight_mask")}
    for m, _ in prunable(net):
        prune.remove(m, "weight")
    net.load_state_dict(state)
    return out


def flax_layout(name, mask):
    return mask.transpose(2, 3, 1, 0) if mask.ndim == 4 else mask.T


def flax_mask_of(masks, torch_name):
    import flax
    path = convert_state_dict({torch_name + ".weight": np.zeros((1, 1))}, "resnet18")["params"]
    key = next(iter(flax.traverse_util.flatten_dict(path)))
    node = masks
    for k in key:
        node = node[k]
    return np.asarray(node)


@pytest.mark.parametrize("round_to", [None, 20])
def test_global_l1_masks_match_torch_global_unstructured(round_to):
    net = torch_net(round_to)
    params = convert_state_dict(net.state_dict(), "resnet18")["params"]
    levels = [0.1, 0.5, 0.9]
    ours = criteria.magnitude_masks(params, levels)
    for level, mine in zip(levels, ours):
        theirs = torch_masks(net, level)
        kept_t = sum(int(m.sum()) for m in theirs.values())
        assert M.count(mine)[0] == kept_t  # identical zero counts, ties or not
        if round_to is None:  # no ties: identical masks
            for name, m in theirs.items():
                np.testing.assert_array_equal(flax_mask_of(mine, name), flax_layout(name, m))


@pytest.mark.parametrize("seed", [0, 1])
def test_global_masks_prune_exact_counts_with_ties_in_flattened_order(seed):
    """The radix-histogram thresholds against a plain numpy stable argsort."""
    rng = np.random.default_rng(seed)
    scores = {"a": {"kernel": jnp.asarray(rng.integers(-5, 5, (300, 7)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(50, 2)).round(1), jnp.float32)},
              "c": {"bias": None}}
    flat = np.concatenate([np.ravel(scores["a"]["kernel"]), np.ravel(scores["b"]["kernel"])])
    ks = [0, 1, 7, 100, 1000, 2199, 2200]
    got = criteria.global_masks_at_counts(scores, ks)
    for k, m in zip(ks, got):
        want = np.ones(flat.size, bool)
        want[np.argsort(flat, kind="stable")[:k]] = False
        mine = np.concatenate([np.ravel(m["a"]["kernel"]), np.ravel(m["b"]["kernel"])])
        np.testing.assert_array_equal(mine, want)
        assert m["c"]["bias"] is None


def test_twenty_levels_compile_once():
    params = create_model("resnet8", 3, width=4).init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))
    before = criteria._magnitude_masks._cache_size()
    levels = [i / 20 for i in range(20)]
    out = criteria.magnitude_masks(params["params"], levels)
    assert criteria._magnitude_masks._cache_size() == before + 1
    n = M.count(out[0])[1]
    assert [n - M.count(m)[0] for m in out] == [criteria.prune_count(s, n) for s in levels]


def test_layerwise_magnitude_prunes_each_layer():
    params = {"a": {"kernel": jnp.arange(20.0).reshape(4, 5)},
              "b": {"kernel": -jnp.arange(10.0).reshape(2, 5), "bias": jnp.ones(5)}}
    m = criteria.magnitude_masks(params, [0.5], scope="layer")[0]
    assert int(m["a"]["kernel"].sum()) == 10 and int(m["b"]["kernel"].sum()) == 5
    assert m["b"]["bias"] is None  # biases are never pruned
    np.testing.assert_array_equal(m["a"]["kernel"].ravel(), np.arange(20) >= 10)


def test_snip_and_random_scores():
    w = {"d": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]])}}
    x = jnp.array([1.0, 2.0])
    loss = lambda p: jnp.sum((x @ p["d"]["kernel"]) ** 2)  # noqa: E731
    g = jax.grad(loss)(w)["d"]["kernel"]
    np.testing.assert_allclose(criteria.snip_scores(loss, w)["d"]["kernel"],
                               jnp.abs(g * w["d"]["kernel"]))
    r = criteria.random_scores(w, jax.random.PRNGKey(0))["d"]["kernel"]
    assert r.shape == (2, 2) and float(r.min()) >= 0


def test_erk_distribution_meets_target_and_favours_small_layers():
    params = {"big": {"kernel": jnp.zeros((3, 3, 64, 64))},
              "small": {"kernel": jnp.zeros((3, 3, 3, 16))},
              "fc": {"kernel": jnp.zeros((64, 10))}}
    dist = criteria.erk_distribution(params, 0.9)
    sizes = {k: params[k]["kernel"].size for k in params}
    kept = sum((1 - dist[k]["kernel"]) * sizes[k] for k in params)
    assert kept == pytest.approx(0.1 * sum(sizes.values()), rel=1e-9)
    assert dist["big"]["kernel"] > dist["fc"]["kernel"] and dist["small"]["kernel"] == 0.0


def test_mask_algebra_and_stacking():
    p = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"bias": jnp.ones(2)}}
    x = {"a": {"kernel": jnp.array([[True, False], [True, True]])}, "b": {"bias": None}}
    y = {"a": {"kernel": jnp.array([[False, False], [True, False]])}, "b": {"bias": None}}
    assert M.count(M.union(x, y))[0] == 3 and M.count(M.intersection(x, y))[0] == 1
    assert M.count(M.difference(x, y))[0] == 2
    st = M.stack([x, y])
    assert st["a"]["kernel"].shape == (2, 2, 2) and st["b"]["bias"] is None
    per = jax.vmap(lambda m: M.apply_masks(p, m)["a"]["kernel"].sum())(st)
    np.testing.assert_array_equal(per, [3, 1])
    assert M.sparsity(x, p) == pytest.approx(0.25)
    assert M.layer_report(x, p) == {"a/kernel": {"kept": 3, "total": 4, "sparsity": 0.25}}


@pytest.mark.parametrize("make_opt", [
    lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.scale_by_adam(),
                        optax.scale(-1e-2)),
    lambda: optax.adamw(1e-2, weight_decay=1e-2),
    lambda: optax.sgd(1e-2, momentum=0.9),
])
def test_pruned_weights_stay_exactly_zero_through_100_steps(make_opt):
    rng = np.random.default_rng(0)
    params = {"l1": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                     "bias": jnp.zeros(16)},
              "l2": {"kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}}
    masks = criteria.magnitude_masks(params, [0.6])[0]
    tx = M.masked_optimizer(make_opt())
    opt_state = tx.init(params)
    x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 32))

    @jax.jit
    def step(p, s):
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            jax.nn.relu(x @ q["l1"]["kernel"] + q["l1"]["bias"]) @ q["l2"]["kernel"], y).mean()
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p, masks=masks)
        return optax.apply_updates(p, u), s

    p = params
    for _ in range(100):
        p, opt_state = step(p, opt_state)
    for name in ("l1", "l2"):
        m = np.asarray(masks[name]["kernel"])
        w = np.asarray(p[name]["kernel"])
        assert np.all(w[~m] == 0.0)
        assert np.all(w[m] != np.asarray(params[name]["kernel"])[m])  # the rest trained


def test_trainable_mask_freezes_weights_bitwise():
    params = {"d": {"kernel": jnp.arange(6.0).reshape(2, 3) - 2.5}}
    frozen = {"d": {"kernel": jnp.array([[True, False, True], [False, False, True]])}}
    tx = M.masked_optimizer(optax.adamw(0.1, weight_decay=0.1))
    s = tx.init(params)
    g = {"d": {"kernel": jnp.ones((2, 3))}}
    p = params
    for _ in range(5):
        u, s = tx.update(g, s, p, trainable=frozen)
        p = optax.apply_updates(p, u)
    changed = np.asarray(p["d"]["kernel"]) != np.asarray(params["d"]["kernel"])
    np.testing.assert_array_equal(changed, np.asarray(frozen["d"]["kernel"]))


def _realistic_variables(model, size, conv_scale=1.0):
    """Init, then BN statistics from a train-mode pass (eval then normalises sensibly).
    conv_scale < 1 shrinks the conv kernels first, so the running variances are small, as in
    real pretrained checkpoints (a variance / std or epsilon mix-up then shows)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, size, size, 3)), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x)
    v = {**v, "params": jax.tree.map_with_path(
        lambda p, w: w * conv_scale if "kernel" in str(p[-1]) and w.ndim == 4 else w,
        v["params"])}
    update = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
    for _ in range(1 if conv_scale == 1 else 60):  # running stats -> this batch's (0.9^60)
        new = update(v)
        v = {**v, "batch_stats": new["batch_stats"]}
    return {"params": v["params"], "batch_stats": new["batch_stats"]}, x


@pytest.mark.parametrize("name, kw, conv_scale", [
    ("resnet18", dict(stem="small", width=8), 1.0),
    ("resnet56", dict(width=8), 1.0),
    ("resnet50", dict(stem="small", width=4), 0.1),  # Bottleneck, small running variances
])
def test_compacted_resnet_equals_masked_dense(name, kw, conv_scale):
    model = create_model(name, 5, **kw)
    v, x = _realistic_variables(model, 16, conv_scale)
    if conv_scale < 1:
        variances = [np.median(s["var"]) for s in jax.tree.leaves(
            v["batch_stats"], is_leaf=lambda t: isinstance(t, dict) and "var" in t)]
        assert np.median(variances) < 0.05
    channel = S.channel_masks(S.filter_l1_scores(v["params"]), 0.5)
    pm = S.param_masks(v["params"], channel)
    masked = model.apply({"params": M.apply_masks(v["params"], pm),
                          "batch_stats": v["batch_stats"]}, x)
    small, sv = S.compact(model, v, channel)
    np.testing.assert_allclose(small.apply(sv, x), masked, atol=1e-5)
    fresh = small.init(jax.random.PRNGKey(1), x)["params"]  # the smaller architecture itself
    assert jax.tree.map(np.shape, sv["params"]) == jax.tree.map(np.shape, fresh)
    if name == "resnet50":  # a bottleneck's two pruned convs share weights: no simple formula
        return
    removed = 0
    for u in S.resnet_units(v["params"]):
        gone = int((~channel[u.name]).sum())
        kh, kw_, cin, _ = v["params"][u.block][u.conv]["kernel"].shape
        nh, nw, _, cout = v["params"][u.block][u.next]["kernel"].shape
        removed += gone * (kh * kw_ * cin + 2 + nh * nw * cout)  # filter, BN scale+bias, fan-out
    assert S.count_params(v["params"]) - S.count_params(sv["params"]) == removed
    assert S.forward_flops(small, sv, (16, 16, 3)) < 0.7 * S.forward_flops(model, v, (16, 16, 3))


def test_channel_masks_never_empty_a_unit_and_prune_highest():
    scores = {"a": np.array([5.0, 1.0, 2.0]), "b": np.array([0.1, 0.2])}
    low = S.channel_masks(scores, 0.8)
    assert low["a"].sum() >= 1 and low["b"].sum() >= 1
    high = S.channel_masks(scores, 0.2, prune="highest")
    np.testing.assert_array_equal(high["a"], [False, True, True])  # 5.0 pruned (20% of 5 = 1)


def test_gradual_schedule_hits_targets_at_scheduled_steps():
    g = schedules.Gradual(initial=0.0, final=0.8, start=10, num_steps=4, frequency=5)
    events = {t: g(t) for t in range(0, 50) if g(t) is not None}
    assert sorted(events) == [10, 15, 20, 25, 30]
    assert events[10] == 0.0 and events[30] == pytest.approx(0.8)
    for t, s in events.items():
        assert s == pytest.approx(0.8 + (0.0 - 0.8) * (1 - (t - 10) / 20) ** 3)
    assert schedules.OneShot(0.5, at=3)(3) == 0.5 and schedules.OneShot(0.5, at=3)(4) is None


def test_gradual_pruning_in_training_reaches_each_target(tmp_path):
    """A real (tiny) training run: after every scheduled step the masks hold the scheduled
    sparsity, pruned weights are zero, and the train step compiled once."""
    from jaxmed.methods import supervised
    from jaxmed.pruning.training import ScheduledPruning
    from jaxmed.train.loop import LoopSettings, train_loop
    from jaxmed.train.writers import MetricWriter
    from tests.configs import tiny

    cfg = tiny.get_config()
    cfg.pruning.criterion = "magnitude"
    cfg.pruning.schedule = "gradual"
    cfg.pruning.target, cfg.pruning.start_step, cfg.pruning.end_step = 0.75, 2, 10
    cfg.pruning.frequency = 2
    seen = {}

    def record(step, state):
        masks = jax.device_get(state.masks)
        seen[step] = M.sparsity(masks)
        params = jax.device_get(state.params)
        zero = jax.tree.map(lambda m, p: None if m is None else bool(np.all(p[~m] == 0)),
                            masks, params, is_leaf=lambda x: x is None)
        assert all(jax.tree.leaves(zero))

    run = supervised.build_run(cfg)
    hook = ScheduledPruning(cfg.pruning)
    train_loop(workdir=str(tmp_path), settings=LoopSettings.from_config(cfg.train),
               state=run.state, train_step=run.train_step, make_stream=run.make_stream,
               evaluate=run.evaluator, mesh=run.mesh, writer=MetricWriter(str(tmp_path)),
               hooks=[record], state_hooks=[hook], final_split="")
    sched = hook.schedule
    for step in range(1, 13):
        last_event = max([t for t in range(step + 1) if sched(t) is not None], default=None)
        want = 0.0 if last_event is None else sched.sparsity_at(last_event)
        assert seen[step] == pytest.approx(want, abs=1e-4), step
    assert seen[12] == pytest.approx(0.75, abs=1e-4)
    assert run.train_step._cache_size() == 1


def test_one_shot_at_step_zero_prunes_before_training(tmp_path):
    """The default schedule (one-shot at start_step 0) prunes before the first step: every
    step trains the pruned network, and a misspelt distribution fails naming the key."""
    from jaxmed.methods import supervised
    from jaxmed.pruning.training import ScheduledPruning
    from tests.configs import tiny

    cfg = tiny.get_config()
    cfg.pruning.criterion, cfg.pruning.target = "magnitude", 0.5
    cfg.train.steps, cfg.train.epochs = 2, 0
    seen = {}
    result = supervised.train_and_evaluate(
        cfg, str(tmp_path), hooks=[lambda step, state: seen.setdefault(
            step, M.sparsity(jax.device_get(state.masks)))])
    assert seen[1] == pytest.approx(0.5, abs=1e-4) and seen[2] == seen[1]
    assert "test/accuracy" in result
    cfg.pruning.distribution = "ERK"
    with pytest.raises(ValueError, match="config.pruning.distribution='ERK'"):
        ScheduledPruning(cfg.pruning)


def test_iterative_magnitude_pruning_with_rewinding():
    init = {"d": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(10, 10)),
                                        jnp.float32)}}

    def train(params, masks):  # "training" scales the weights by their index pattern
        return M.apply_masks(jax.tree.map(lambda w: w * (1 + jnp.arange(10.0)), params), masks)

    rounds = schedules.iterative_magnitude_pruning(train, init, rounds=3, rate=0.2)
    for r, rd in enumerate(rounds, 1):
        assert rd.sparsity == pytest.approx(1 - 0.8**r, abs=0.01)
    prev = rounds[0].masks["d"]["kernel"]
    for rd in rounds[1:]:
        cur = rd.masks["d"]["kernel"]
        assert not np.any(np.asarray(cur) & ~np.asarray(prev))  # pruned weights stay pruned
        prev = cur
    # The last round trained from the initialisation (rewound), not from round 2's weights.
    kept = np.asarray(rounds[-2].masks["d"]["kernel"])
    expected = np.asarray(init["d"]["kernel"] * (1 + jnp.arange(10.0)))
    np.testing.assert_array_equal(np.asarray(rounds[-1].trained["d"]["kernel"])[kept],
                                  expected[kept])
