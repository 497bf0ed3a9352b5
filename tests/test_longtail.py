"""`config.data.train_imbalance`: the long-tailed subsample of a training split (jaxmed.data.
longtail) against a numpy reference written here, on planted, unordered class counts."""

import numpy as np
import pytest

from jaxmed import data as data_lib
from jaxmed.data import longtail
from jaxmed.data.sources import TableSource, record_indices, source_labels
from tests.data_helpers import data_config

# class 2 is the largest, class 1 the smallest: the ranking is not the class order
PLANTED = np.array([40, 7, 90, 25, 60])


def reference_counts(counts, imbalance):
    """Cao et al.'s IMBALANCECIFAR profile over the classes ranked by count, capped."""
    counts = np.asarray(counts)
    rank = np.empty(len(counts), int)
    rank[sorted(range(len(counts)), key=lambda c: (-counts[c], c))] = np.arange(len(counts))
    n_max = counts.max()
    return np.array([min(counts[c], int(n_max * imbalance ** (rank[c] / (len(counts) - 1))))
                     for c in range(len(counts))])


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("lt") / "planted.npz"
    arrays = {}
    for s, counts in (("train", PLANTED), ("val", [3, 2, 4, 1, 2]), ("test", [5, 4, 3, 2, 1])):
        y = rng.permutation(np.repeat(np.arange(5), counts))
        arrays[f"{s}_labels"] = y[:, None]
        # each image carries its position, so a kept record can be traced to its source image
        img = np.zeros((len(y), 28, 28), np.uint8)
        img[:, 0, 0], img[:, 0, 1] = np.arange(len(y)) % 256, np.arange(len(y)) // 256
        arrays[f"{s}_images"] = img
    np.savez(path, **arrays)
    return path, arrays


def test_reference_profile_by_hand():
    # ranks: class 2 (90), 4 (60), 0 (40), 3 (25), 1 (7); 90 * 0.1 ** (r / 4), class 1 capped
    np.testing.assert_array_equal(reference_counts(PLANTED, 0.1), [28, 7, 90, 16, 50])


@pytest.mark.parametrize("imbalance", [0.1, 0.3, 1.0])
def test_subsample_counts_images_and_class_counts(npz, imbalance):
    path, arrays = npz
    ds = data_lib.build(data_config("medmnist", path, train_imbalance=imbalance, split_seed=5))
    want = reference_counts(PLANTED, imbalance)
    y = source_labels(ds["train"])
    np.testing.assert_array_equal(np.bincount(y, minlength=5), want)
    np.testing.assert_array_equal(ds.info.class_counts, want)
    # records keep their stable index, and it points at the source image of the same label
    idx = record_indices(ds["train"])
    assert len(set(idx.tolist())) == len(idx) == want.sum()
    np.testing.assert_array_equal(arrays["train_labels"][idx, 0], y)
    for i in (0, len(idx) // 2, len(idx) - 1):
        rec = ds["train"][i]
        img = rec["image"][..., 0]
        assert int(rec["index"]) == idx[i] == int(img[0, 0]) + 256 * int(img[0, 1])
    for s in ("val", "test"):  # as shipped
        np.testing.assert_array_equal(source_labels(ds[s]), arrays[f"{s}_labels"][:, 0])


def test_subsample_is_seeded(npz):
    path, _ = npz

    def kept(seed):
        ds = data_lib.build(data_config("medmnist", path, train_imbalance=0.1, split_seed=seed))
        return record_indices(ds["train"])

    np.testing.assert_array_equal(kept(1), kept(1))
    assert not np.array_equal(kept(1), kept(2))


def test_table_source_keeps_its_ids():
    labels = np.repeat(np.arange(3), [5, 20, 10])
    src = TableSource([f"/x/{i}.png" for i in range(35)], labels, ids=np.arange(35) + 1000)
    ds = data_lib.Dataset({"train": src}, data_lib.DatasetInfo("t", ["a", "b", "c"], False, 1))
    data_lib.long_tail(ds, 0.2, 0)
    want = reference_counts([5, 20, 10], 0.2)  # [4, 20, 8]
    np.testing.assert_array_equal(ds.info.class_counts, want)
    idx = record_indices(ds["train"])
    assert isinstance(ds["train"], TableSource) and (idx >= 1000).all()
    np.testing.assert_array_equal(labels[idx - 1000], source_labels(ds["train"]))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5])
def test_bad_imbalance_names_the_key(bad):
    cfg = data_lib.default_config()
    cfg.train_imbalance = bad
    with pytest.raises(ValueError, match=r"^config.data.train_imbalance=.*\(0, 1\]"):
        data_lib.check_config(cfg)
    for odd in (True, "0.1"):  # a ConfigDict would coerce / refuse these; the helper names them
        with pytest.raises(ValueError, match=r"^config.data.train_imbalance="):
            longtail.check_imbalance(odd)


def test_a_class_left_empty_names_the_key_and_class(npz):
    path, _ = npz
    # 90 * 0.005 = 0.45: the smallest-ranked class (class_1, 7 images) would keep none
    with pytest.raises(ValueError, match=r"config.data.train_imbalance=0.005 leaves 1 class.*"
                                         r"'class_1' \(7 images"):
        data_lib.build(data_config("medmnist", path, train_imbalance=0.005))


def test_multi_label_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="config.data.train_imbalance=0.5: .*single-label"):
        longtail.subsample_indices(np.ones((4, 3)), 0.5, 0)


def test_teacher_stage_trains_on_the_full_split(monkeypatch, tmp_path):
    from jaxmed.methods import fopro_kd, supervised
    from jaxmed.methods.fopro_kd import teachers

    seen = {}

    def fake(c, out):
        seen["imbalance"] = c.data.train_imbalance
        return {"test/accuracy": 1.0}

    monkeypatch.setattr(supervised, "train_and_evaluate", fake)
    c = fopro_kd.default_config()
    c.data.train_imbalance = 0.1
    c.kd.teacher_stage.epochs = 1
    teachers.train_teacher_stage(c, str(tmp_path))
    assert seen == {"imbalance": 1.0} and c.data.train_imbalance == 0.1
