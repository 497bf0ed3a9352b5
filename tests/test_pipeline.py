"""grain pipelines: order, sharding, exact-once evaluation, resume, workers, streams, augment,
inspect CLI and TFDS ArrayRecord round trip."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxmed import data as data_lib
from jaxmed.data import augment
from jaxmed.data.pipeline import (Preprocess, TwoViews, eval_batches, semi_supervised_stream,
                                  train_stream)
from jaxmed.data.sources import split_by_class_groups
from jaxmed.data.images import decode_image
from jaxmed.data.synthetic import SyntheticSource, SyntheticSpec
from tests.conftest import REPO, subprocess_env
from tests.data_helpers import data_config, ham10000_folder

PRE = Preprocess(16, 3, "flip")


@pytest.fixture(scope="module")
def source():
    return SyntheticSource(SyntheticSpec(num_classes=3, num_samples=37, image_size=16))


def indices(stream, n):
    return [next(stream)["index"].tolist() for _ in range(n)]


def test_same_seed_same_order_new_order_each_epoch(source):
    a = indices(train_stream(source, global_batch=8, preprocess=PRE, seed=3, num_epochs=2), 8)
    b = indices(train_stream(source, global_batch=8, preprocess=PRE, seed=3, num_epochs=2), 8)
    c = indices(train_stream(source, global_batch=8, preprocess=PRE, seed=4, num_epochs=2), 8)
    assert a == b and a != c
    assert a[:4] != a[4:]  # epoch 2 is another permutation
    epoch1 = sum(a[:4], [])
    assert len(set(epoch1)) == 32  # 37 // 8 whole batches; no sample twice in an epoch


def test_processes_get_disjoint_complete_shards(source):
    single = indices(train_stream(source, global_batch=8, preprocess=PRE, seed=0, num_epochs=1),
                     4)
    shards = [indices(train_stream(source, global_batch=8, preprocess=PRE, seed=0, num_epochs=1,
                                   process_index=p, process_count=2), 4) for p in range(2)]
    for step in range(4):
        a, b = set(shards[0][step]), set(shards[1][step])
        assert not a & b and a | b == set(single[step])  # each global batch, split in two


@pytest.mark.parametrize("batch, processes", [(8, 1), (16, 1), (40, 1), (8, 2), (12, 2)])
def test_evaluation_sees_every_sample_exactly_once(source, batch, processes):
    seen, shapes = [], set()
    for p in range(processes):
        for b in eval_batches(source, global_batch=batch, preprocess=Preprocess(16, 3),
                              process_index=p, process_count=processes):
            seen += b["index"][b["valid"]].tolist()
            shapes.add(b["image"].shape)
    assert sorted(seen) == list(range(37))
    assert shapes == {(batch // processes, 16, 16, 3)}  # padded: one shape, one compile


def test_restored_iterator_continues_with_the_next_batch(source):
    s1 = train_stream(source, global_batch=8, preprocess=PRE, seed=0, num_epochs=3)
    for _ in range(5):
        next(s1)
    state = s1.iterator.get_state()
    expected = next(s1)
    s2 = train_stream(source, global_batch=8, preprocess=PRE, seed=0, num_epochs=3)
    s2.iterator.set_state(state)
    got = next(s2)
    np.testing.assert_array_equal(got["index"], expected["index"])
    np.testing.assert_array_equal(got["image"], expected["image"])  # augmentation too


def test_worker_processes_give_the_same_batches(source):
    a = train_stream(source, global_batch=8, preprocess=PRE, seed=0, num_epochs=1)
    b = train_stream(source, global_batch=8, preprocess=PRE, seed=0, num_epochs=1, num_workers=2)
    for _ in range(4):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])


def test_semi_supervised_stream_pairs_views_of_one_image(source):
    weak, strong = Preprocess(16, 3, "flip|translate(2)"), Preprocess(16, 3, "randaugment(2,10)|"
                                                                             "cutout(4)", seed=9)
    unlabeled = SyntheticSource(SyntheticSpec(num_classes=3, num_samples=50, image_size=16,
                                              seed=5))
    s = semi_supervised_stream(source, unlabeled, global_batch=4, mu=3, labeled_preprocess=PRE,
                               views=TwoViews(weak, strong), seed=0, num_steps=20)
    b = next(s)
    assert b["labeled"]["image"].shape == (4, 16, 16, 3)
    u = b["unlabeled"]
    assert u["weak"].shape == u["strong"].shape == (12, 16, 16, 3)
    for i in range(3):  # the two views are of the same sample, differently augmented
        idx = int(u["index"][i])
        raw = unlabeled[idx]["image"]
        assert np.abs(u["weak"][i].astype(int) - raw).mean() < np.abs(
            u["weak"][i].astype(int) - unlabeled[(idx + 1) % 50]["image"]).mean()
    seen = [next(s)["unlabeled"]["index"] for _ in range(3)]
    assert len(set(np.concatenate([u["index"], *seen]).tolist())) == 48  # 4 x 12, no repeats


def test_continual_tasks_by_class_groups():
    src = SyntheticSource(SyntheticSpec(num_classes=4, num_samples=40, image_size=8))
    tasks = split_by_class_groups(src, [[0, 1], [2, 3]])
    assert sum(len(t) for t in tasks) == 40
    assert set(tasks[0].labels) == {0, 1} and set(tasks[1].labels) == {2, 3}
    with pytest.raises(ValueError, match="overlap"):
        split_by_class_groups(src, [[0, 1], [1, 2]])


# ---------------------------------------------------------------------------- augment
def test_host_augmentations_keep_shape_and_are_seeded():
    x = SyntheticSource(SyntheticSpec(image_size=32))[0]["image"]
    chain = augment.parse_steps("rrc(0.3)|flip|rotate(15)|translate(4)|randaugment(2,10)|cutout(8)")
    a = augment.apply_steps(chain, x, np.random.default_rng(1))
    b = augment.apply_steps(chain, x, np.random.default_rng(1))
    c = augment.apply_steps(chain, x, np.random.default_rng(2))
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    gray = augment.apply_steps(chain, x[..., :1], np.random.default_rng(1))
    assert gray.shape == (32, 32, 1)
    with pytest.raises(ValueError, match="blur"):
        augment.parse_steps("flip|blur(3)")


def test_randaugment_ops_all_run():
    x = SyntheticSource(SyntheticSpec(image_size=24))[1]["image"]
    img = augment._pil(x)
    for name, op in augment.RANDAUGMENT_OPS:
        out = np.asarray(op(img, 1.0, np.random.default_rng(0), (128, 128, 128)))
        assert out.shape == x.shape, name
    assert len(augment.RANDAUGMENT_OPS) == 14


def test_device_augmentations():
    import jax
    import jax.numpy as jnp
    x = jnp.asarray(np.random.default_rng(0).random((6, 8, 8, 3)), jnp.float32)
    f = augment.device_flip(jax.random.PRNGKey(0), x)
    flipped = [bool(jnp.all(f[i] == x[i, :, ::-1])) for i in range(6)]
    same = [bool(jnp.all(f[i] == x[i])) for i in range(6)]
    assert all(a or b for a, b in zip(flipped, same)) and any(flipped) and any(same)
    t = augment.device_translate(jax.random.PRNGKey(1), x, pad=2)
    assert t.shape == x.shape
    c = augment.device_color(jax.random.PRNGKey(2), x)
    assert c.shape == x.shape and float(c.min()) >= 0 and float(c.max()) <= 1
    n = augment.normalize(jnp.full((1, 2, 2, 3), 255, jnp.uint8))
    np.testing.assert_allclose(n[0, 0, 0], (1 - np.array(augment.IMAGENET_MEAN)) /
                               np.array(augment.IMAGENET_STD), rtol=1e-6)


# ---------------------------------------------------------------------- inspect CLI
def run_inspect(*args):
    return subprocess.run([sys.executable, "-m", "jaxmed.data.inspect", *map(str, args)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)


def test_inspect_cli(shared_dir, tmp_path):
    root = tmp_path / "ham"
    ham10000_folder(str(root), os.path.join(shared_dir, "samples"), real_jpeg_for="ISIC_0025030")
    ok = run_inspect("--dataset", "ham10000", "--root", root)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["num_records"] == 40
    assert report["class_counts"] == {c: 40 if c == "bkl" else 0 for c in
                                      ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}
    assert report["attr_counts"]["sex"] == {"0": 32, "1": 8}
    assert report["missing_files"] == [] and report["bad_files"] == []

    jpeg = root / "HAM10000_images_part_2" / "ISIC_0025030.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:2000])  # truncated: corrupt
    bad = run_inspect("--dataset", "ham10000", "--root", root)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["bad_files"] == [str(jpeg)]

    meta = root / "HAM10000_metadata.csv"
    meta.write_text(meta.read_text().replace("lesion_id,image_id,dx,", "lesion_id,image,dx,", 1))
    broken = run_inspect("--dataset", "ham10000", "--root", root)
    assert broken.returncode == 2
    assert "HAM10000_metadata.csv" in broken.stderr and "image_id" in broken.stderr


# ------------------------------------------------------------------------------ TFDS
def test_tfds_builder_round_trips_images_bit_exactly(shared_dir, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from jaxmed.data.tfds import prepare

    root = tmp_path / "ham"
    ham10000_folder(str(root), os.path.join(shared_dir, "samples"), real_jpeg_for="ISIC_0027419")
    cfg = data_config("ham10000", root)
    original = data_lib.build(cfg)
    prepared = prepare(cfg, str(tmp_path / "tfds"))
    ds = data_lib.build(data_config("tfds", prepared))
    assert ds.info.class_names == original.info.class_names
    for split in ("train", "val", "test"):
        src, ref = ds[split], original[split]
        assert len(src) == len(ref)
        by_index = {int(ref[i]["index"]): ref[i] for i in range(len(ref))}
        for i in range(len(src)):
            rec = src[i]
            want = by_index[int(rec["index"])]
            assert rec["image"] == open(want["image"], "rb").read()  # the file's own bytes
            assert rec["label"] == want["label"] and rec["attrs"] == want["attrs"]
    real = open(os.path.join(shared_dir, "samples", "ISIC_0024310.jpg"), "rb").read()
    assert any(ds[s][i]["image"] == real for s in ds.splits for i in range(len(ds[s])))
    batch = next(eval_batches(ds["train"], global_batch=4, preprocess=Preprocess(32, 3)))
    assert batch["image"].shape == (4, 32, 32, 3)
    small = data_lib.build(data_config("tfds", prepare(cfg, str(tmp_path / "tfds"), max_side=64)))
    images = [small[s][i]["image"] for s in small.splits for i in range(len(small[s]))]
    sides = [min(decode_image(b).shape[:2]) for b in images]
    assert max(sides) == 64 and sides.count(64) == 1  # only the 600x450 sample was shrunk
    assert len(images[sides.index(64)]) < len(real) // 4


def test_medmnist_quickstart_adapts_the_model(tmp_path):
    """The quickstart runs on a 28 px grayscale MedMNIST file: size, channels, classes follow."""
    from jaxmed.methods import supervised
    from tests.configs import tiny

    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 64), ("val", 16), ("test", 16)):
        y = rng.integers(0, 2, n)
        img = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8) + (y * 150)[:, None, None].astype(
            np.uint8)
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = img, y[:, None]
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    cfg = tiny.get_config()
    cfg.data.name, cfg.data.root = "medmnist", str(tmp_path / "pneumoniamnist.npz")
    cfg.train.epochs = 3
    result = supervised.train_and_evaluate(cfg, str(tmp_path / "w"))
    assert result["test/balanced_accuracy"] >= 0.9  # bright vs dark: learnable in 12 steps
    saved = json.load(open(tmp_path / "w" / "config.json"))
    assert saved["data"]["name"] == "medmnist"
