"""HTL steps and runs: oversampling counts, checkpointable weighted streams, one compile per
step, the identification hook, identification over a planted set (1 and 8 devices), the
synthetic hard sub-population, the isic2018_seg adapter, a :tiny comparison end to end, and
:tiny_ssl (HTL among unlabeled samples on TEAR's step) end to end."""

import csv
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxmed import data as data_lib
from jaxmed import losses
from jaxmed.data import augment
from jaxmed.data.pipeline import (Preprocess, eval_batches, train_stream, weighted_epoch_order,
                                  weighted_train_stream)
from jaxmed.data.sources import ArraySource
from jaxmed.data.synthetic import SyntheticSource, SyntheticSpec
from jaxmed.methods import htl
from jaxmed.methods.htl import attention, identify
from jaxmed.methods.htl import step as htl_step
from jaxmed.models import create_model
from jaxmed.train import build, sharding, steps
from jaxmed.train.checkpoint import Checkpointer
from tests import htl_planted as P
from tests.conftest import REPO, run_python


def source(n=50, size=4):
    imgs = (np.arange(n)[:, None, None, None] * np.ones((1, size, size, 3))).astype(np.uint8)
    return ArraySource(imgs, np.arange(n) % 3)


PRE = Preprocess(4, 3, "flip", 0)


def indices(stream):
    return [b["index"].tolist() for b in stream]


# ---------------------------------------------------------------------------- oversampling
def test_oversampled_epoch_counts_are_the_expected_counts_rounded():
    n, per_epoch = 50, 48
    w = np.ones(n)
    w[[1, 7, 30]] = [5.0, 3.0, 0.0]
    order = weighted_epoch_order(n, per_epoch, seed=3, epoch=2, weights=w)
    counts = np.bincount(order, minlength=n)
    expected = per_epoch * w / w.sum()
    assert len(order) == per_epoch
    assert np.all((counts == np.floor(expected)) | (counts == np.ceil(expected)))
    assert counts[1] >= 4 and counts[30] == 0
    # over many epochs the mean count converges to the expectation (seeded, no flakiness)
    mean = np.mean([np.bincount(weighted_epoch_order(n, per_epoch, 3, e, w), minlength=n)
                    for e in range(200)], 0)
    np.testing.assert_allclose(mean, expected, atol=0.08)
    # the stream yields exactly that epoch (one process), shuffled, local batches of 8
    s = weighted_train_stream(source(), global_batch=8, preprocess=PRE, seed=3, num_epochs=1,
                              weights=w)
    got = np.concatenate([b["index"] for b in s])
    assert np.array_equal(np.bincount(got, minlength=n),
                          np.bincount(weighted_epoch_order(n, per_epoch, 3, 0, w), minlength=n))
    with pytest.raises(ValueError, match="sampling weights"):
        weighted_epoch_order(n, per_epoch, 0, 0, -w)


def test_unweighted_stream_is_train_stream_and_shards_per_process():
    a = indices(train_stream(source(), global_batch=8, preprocess=PRE, seed=3, num_epochs=2))
    b = indices(weighted_train_stream(source(), global_batch=8, preprocess=PRE, seed=3,
                                      num_epochs=2))
    assert a == b and len(a) == 12
    w = np.linspace(0.5, 3, 50)
    one = indices(weighted_train_stream(source(), global_batch=8, preprocess=PRE, seed=1,
                                        num_epochs=1, weights=w))
    two = [indices(weighted_train_stream(source(), global_batch=8, preprocess=PRE, seed=1,
                                         num_epochs=1, weights=w, process_index=p,
                                         process_count=2)) for p in range(2)]
    assert [sorted(x + y) for x, y in zip(*two)] == [sorted(x) for x in one]


def test_weighted_stream_state_survives_checkpoint_restore(tmp_path):
    w = np.ones(50)
    w[:5] = 4.0

    def run(restore_at=None):
        s = weighted_train_stream(source(), global_batch=8, preprocess=PRE, seed=0,
                                  num_epochs=3)
        out = []
        for step in range(1, 19):
            if restore_at == step - 1:  # a fresh process: new stream restored from disk
                ck = Checkpointer(str(tmp_path / "ck"), keep=1)
                s = weighted_train_stream(source(), global_batch=8, preprocess=PRE, seed=0,
                                          num_epochs=3)
                ck.restore(None, {"x": jnp.zeros(())}, data_iterator=s.iterator)
                ck.close()
            out.append(next(s)["index"].tolist())
            if step == 6:  # end of epoch 1: oversample from epoch 2 on
                s.iterator.set_weights(w)
            if restore_at == step:
                ck = Checkpointer(str(tmp_path / "ck"), keep=1)
                ck.save(step, {"x": jnp.zeros(())}, data_iterator=s.iterator)
                ck.close()
        return out

    plain = run()
    assert run(restore_at=8) == plain          # mid-epoch, weights in force
    shutil.rmtree(tmp_path / "ck")
    assert run(restore_at=6) == plain          # at the boundary, weights pending
    later = np.concatenate(plain[6:12])
    assert np.sum(later < 5) > 5 * 48 / 50 * 2  # epoch 2 oversamples the first five
    assert np.sum(np.concatenate(plain[:6]) < 5) == 5  # epoch 1 did not


# ------------------------------------------------------------------- steps and compiles
@pytest.fixture(scope="module")
def tiny_unet():
    mesh = sharding.make_mesh()
    model = create_model("unet_resnet18", 1, width=4, stem="small")
    cfg = htl.default_config().train
    tx = build.make_optimizer(cfg, 100)
    v = jax.jit(lambda r, x: model.init(r, x))(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    state = build.create_state(jax.device_get(dict(v)), tx, jax.random.PRNGKey(1), mesh,
                               index_bound=24)
    step = steps.jit_train_step(htl_step.make_train_step(model, tx, task="segmentation"), mesh)
    spec = SyntheticSpec(num_samples=24, image_size=16, with_mask=True, hard_rate=0.3)
    src = SyntheticSource(spec)
    batch = next(eval_batches(src, global_batch=8, preprocess=Preprocess(16, 3)))
    return mesh, model, state, step, batch, src


def test_weighted_loss_and_one_compile_per_step(tiny_unet):
    mesh, model, state, step, batch, _ = tiny_unet
    g = sharding.to_global(batch, mesh)
    s2, m = step(jax.tree.map(jnp.copy, state), g)
    assert float(m["loss"]) == pytest.approx(float(m["plain_loss"]), rel=1e-6)
    table = np.ones(24, np.float32)
    table[batch["index"][2]] = 5.0
    weighted = state.replace(sample_weight=sharding.replicate(table, mesh))
    _, mw = step(jax.tree.map(jnp.copy, weighted), g)
    # oracle: the per-sample Dice + BCE of the same train-mode forward, weighted by hand
    logits, _ = steps.forward(model, jax.device_get(state.variables),
                              augment.normalize(batch["image"]), train=True)
    per = np.asarray(losses.dice_bce(logits, htl_step.target_masks(batch["mask"])))
    assert float(mw["loss"]) == pytest.approx((per.sum() + 4 * per[2]) / 8, rel=1e-5)
    assert float(mw["attended"]) == pytest.approx(1 / 8)
    for _ in range(3):
        s2, _ = step(s2, g)
    assert step._cache_size() == 1


def test_hook_rewrites_weights_and_identification_compiles_once(tiny_unet, tmp_path):
    mesh, model, state, step, batch, src = tiny_unet
    fn = identify.make_identify_fn(model, task="segmentation", mesh=mesh)

    class Writer:
        rows = []

        def write(self, s, scalars):
            self.rows.append((s, scalars))

    writer = Writer()
    hook = attention.AttentionHook(
        fn, lambda: eval_batches(src, global_batch=8, preprocess=Preprocess(16, 3)), mesh,
        (0.3, 0.5, 0.9), every=2, total=10, attention="weight", weight=3.0, top_q=0.25,
        positions=np.arange(24), stream=lambda: None, workdir=str(tmp_path))
    assert hook.with_writer(writer) is hook  # the Run.state_hooks factory (writer -> hook)
    s = jax.tree.map(jnp.copy, state)
    assert hook(1, s) is s  # not an identification step
    for k in (2, 4):
        s = hook(k, s)
    w = np.asarray(s.sample_weight)
    saved = np.load(tmp_path / "htl" / "step_0000004.npz")
    assert sorted(np.flatnonzero(w == 3.0)) == sorted(saved["index"][saved["htl"]])
    assert (w == 3.0).sum() == 6 and set(np.unique(w)) == {1.0, 3.0}  # top 25% of 24
    assert fn._cache_size() == 1
    assert len(attention.read_history(str(tmp_path))) == 2
    assert [s for s, _ in writer.rows] == [2, 4] and writer.rows[1][1]["htl/size"] == 6


# ---------------------------------------------------------------------- identification
def test_identification_returns_exactly_the_planted_samples():
    mesh = sharding.make_mesh()
    images, y = P.planted_images()
    fn = identify.make_identify_fn(P.PixelLinear(), task="classification", mesh=mesh)
    out = identify.identify_samples(fn, P.params(), {}, P.SPARSITIES,
                                    eval_batches(ArraySource(images, y), global_batch=16,
                                                 preprocess=Preprocess(None, 1)), mesh)
    assert out["index"].tolist() == list(range(P.N))  # padding dropped, sorted
    assert np.flatnonzero(out["htl"]).tolist() == P.PLANTED
    assert out["levels"].shape == (P.N, 3)


def test_identification_on_eight_devices():
    proc = run_python([os.path.join("tests", "scripts", "htl_sharded_identify.py")], devices=8)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8 and res["shards"] == 8
    assert res["htl"] == P.PLANTED and res["index"] == list(range(P.N))


# ------------------------------------------------------------------------------- data
# Means / mask areas of SyntheticSpec(num_samples=40, image_size=32, with_mask=True, seed=1)
# recorded before the hard knobs existed (first 12 images).
OLD_MEANS = [177.532, 85.312, 79.707, 182.805, 74.454, 167.526, 174.572, 81.408, 176.201,
             83.506, 175.606, 174.178]
OLD_AREAS = [128, 114, 105, 156, 227, 163, 169, 198, 183, 177, 124, 196]
OLD_LABELS = [0, 2, 1, 2, 0, 0, 0, 2, 1, 1, 0, 2, 2, 1, 2, 3, 0, 1, 3, 2]
OLD_BIAS = [0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1]


def test_synthetic_hard_rate_zero_reproduces_the_old_data_and_hard_samples_are_marked():
    base = dict(num_samples=40, image_size=32, with_mask=True, seed=1)
    old = SyntheticSource(SyntheticSpec(**base))
    recs = [old[i] for i in range(12)]
    np.testing.assert_allclose([r["image"].mean() for r in recs], OLD_MEANS, atol=0.01)
    assert [int((r["mask"] > 0).sum()) for r in recs] == OLD_AREAS
    assert old.labels[:20].tolist() == OLD_LABELS and old.bias[:20].tolist() == OLD_BIAS
    assert set(recs[0]["attrs"]) == {"bias"}
    for kind in ("small", "low_contrast", "both"):
        new = SyntheticSource(SyntheticSpec(**base, hard_rate=0.3, hard_kind=kind))
        hard = new.hard
        assert 4 <= hard.sum() <= 20
        for i in range(40):
            a, b = old[i], new[i]
            assert b["attrs"]["hard"] == int(hard[i])
            same = np.array_equal(a["image"], b["image"])
            assert same == (not hard[i]), (kind, i)  # only the hard ones change
            area_a, area_b = (a["mask"] > 0).sum(), (b["mask"] > 0).sum()
            if hard[i] and kind != "low_contrast":
                assert area_b < 0.3 * area_a
            elif hard[i]:  # same outline, fainter: closer to the skin around it
                assert area_b == area_a
                inside = a["mask"] > 0
                tone = a["image"][~inside].mean(0)
                assert (np.abs(b["image"][inside] - tone).mean()
                        < 0.5 * np.abs(a["image"][inside] - tone).mean())
    with pytest.raises(ValueError, match="hard_kind"):
        SyntheticSpec(hard_rate=0.1, hard_kind="tiny")


def test_isic2018_seg_adapter_reads_task1_layout(tmp_path, shared_dir):
    real = os.path.join(shared_dir, "samples", "ISIC_0000000_segmentation.png")
    d = tmp_path / "ISIC2018_Task1-2_Training_Input"
    m = tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    d.mkdir()
    m.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(
            d / f"ISIC_{i:07d}.jpg")
        if i == 0:
            shutil.copy(real, m / "ISIC_0000000_segmentation.png")
        else:
            mask = np.zeros((30, 40), np.uint8)
            mask[4:8 + 2 * i, 8:30] = 255
            Image.fromarray(mask).save(m / f"ISIC_{i:07d}_segmentation.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "ISIC_0000099.jpg")  # no mask
    cfg = data_lib.default_config()
    cfg.name, cfg.root = "isic2018_seg", str(tmp_path)
    ds = data_lib.build(cfg)
    assert sum(len(ds[s]) for s in ("train", "val", "test")) == 10
    pre = Preprocess(16, 3)
    for split in ("train", "val", "test"):
        for i in range(len(ds[split])):
            rec = pre(0, ds[split][i])
            assert rec["image"].shape == (16, 16, 3) and rec["mask"].shape == (16, 16)
            assert set(np.unique(rec["mask"])) <= {0, 255}
            k = int(rec["index"])
            name = os.path.basename(ds[split][i]["mask"])
            assert name.startswith(os.path.basename(ds[split][i]["image"])[:-4])
            if k and name != "ISIC_0000000_segmentation.png":
                assert (rec["mask"] > 0).sum() > 0
    real_mask = np.asarray(Image.open(real))
    assert real_mask.max() == 255  # the real file is a 0/255 mask the adapter reads as is


# ------------------------------------------------------------------------ end to end
def tiny_config(variant="tiny"):
    spec = importlib.util.spec_from_file_location(
        "htl_quick", os.path.join(REPO, "configs", "htl", "quick.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def test_check_config_names_the_key():
    c = tiny_config()
    c.model.name = "resnet18"
    with pytest.raises(ValueError, match="config.model.name"):
        htl.check_config(c)
    c = tiny_config()
    c.data.synthetic.with_mask = False
    with pytest.raises(ValueError, match="with_mask"):
        htl.check_config(c)
    c = tiny_config()
    c.htl.methods = ("baseline", "htl_boost")
    with pytest.raises(ValueError, match="config.htl.methods"):
        htl.check_config(c)


def test_tiny_comparison_writes_comparison_csv(tmp_path):
    c = tiny_config()
    c.htl.methods = ("baseline", "htl_oversample")  # htl_weight: the hook test above
    c.htl.seeds = (0, 1)
    htl.train_and_evaluate(c, str(tmp_path))
    with open(tmp_path / "report" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["baseline", "htl_oversample"]
    cols = set(rows[0])
    for m in ("iou", "dice", "thresholded_jaccard"):
        for prefix in ("test/", "test/hard_1/", "test/hard_0/", "test/bias_0/"):
            assert f"{prefix}{m}" in cols and f"{prefix}{m}_std" in cols
    for r in rows:
        assert r["seeds"] == "2" and 0 <= float(r["test/hard_1/iou"]) <= 1
    for f in ("summary.md", "htl_over_training.png", "htl_examples.png", "htl_shares.png"):
        assert (tmp_path / "report" / f).exists(), f
    hist = attention.read_history(str(tmp_path / "runs" / "htl_oversample" / "seed_0"))
    assert [h["step"] for h in hist] == [4]  # every epoch (4 steps), not at the last step


def test_tiny_semi_supervised_weights_the_identified_unlabeled_samples(tmp_path):
    """HTL among unlabeled samples on TEAR's FixMatch step: baseline + htl_weight end to end;
    the state's sample_weight table (final checkpoint) is htl.weight exactly on the last
    identified unlabeled indices and 1 elsewhere, and the baseline's stays 1."""
    from jaxmed.data.sources import record_indices
    from jaxmed.methods.tear import data as ssl_data

    c = tiny_config("tiny_ssl")
    htl.train_and_evaluate(c, str(tmp_path))
    with open(tmp_path / "report" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["baseline", "htl_weight"]
    for m in ("test/auc", "test/balanced_accuracy", "test/bias_1/auc"):
        assert m in rows[0] and f"{m}_std" in rows[0]
        assert all(0 <= float(r[m]) <= 1 for r in rows)
    run = tmp_path / "runs" / "htl_weight" / "seed_0"
    assert [h["step"] for h in attention.read_history(str(run))] == [5]  # 84 // (2 x 8) steps
    saved = np.load(run / "htl" / "step_0000005.npz")
    ds = data_lib.build(c.data)
    labeled, unlabeled = ssl_data.from_num_labeled(ds["train"], c.ssl.num_labeled,
                                                   c.ssl.split_seed)
    assert sorted(saved["index"]) == sorted(record_indices(unlabeled))
    chosen = saved["index"][saved["htl"]]
    assert len(chosen) == 21  # top 25% of the 84 unlabeled samples

    def weights(method):
        ck = Checkpointer(str(tmp_path / "runs" / method / "seed_0" / "checkpoints"))
        state, _ = ck.restore_raw()
        ck.close()
        return np.asarray(state["sample_weight"])

    w = weights("htl_weight")
    assert len(w) == 96
    assert sorted(np.flatnonzero(w != 1.0).tolist()) == sorted(chosen.tolist())
    assert np.all(w[chosen] == c.htl.weight)
    assert np.all(w[record_indices(labeled)] == 1.0)
    assert np.all(weights("baseline") == 1.0)
    c.htl.methods = ("baseline", "htl_oversample")
    with pytest.raises(ValueError, match="htl_oversample"):
        htl.check_config(c)
    c = tiny_config("tiny_ssl")
    c.htl.ssl_algorithm = "supervised"
    with pytest.raises(ValueError, match="config.htl.ssl_algorithm"):
        htl.check_config(c)
