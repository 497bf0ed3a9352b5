"""Inputs no TEAR / HTL run can use, refused in one line naming the key or file (issue 24):
`ssl.num_labeled` outside the train split's range or its batches (before anything runs where
the config fixes the data, else once the data is read; through the CLI one line, exit 2),
split lists shorter than a batch, a byte-order mark in a TEAR split list, a class without a
labeled sample, and an HTL cadence whose first identification would come after the run's
end."""

import os
import re

import numpy as np
import pytest

from jaxmed.config_check import ConfigKeyError, sibling
from jaxmed.data.sources import ArraySource
from jaxmed.methods import htl, tear
from jaxmed.methods.tear import data as ssl_data
from tests.conftest import REPO, run_python

TEAR_QUICK = sibling(os.path.join(REPO, "configs", "tear", "x.py"), "quick")
HTL_QUICK = sibling(os.path.join(REPO, "configs", "htl", "x.py"), "quick")


def _images(folder, names):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for k, n in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(os.path.join(folder, n))


def _source(labels):
    labels = np.asarray(labels, np.int64)
    return ArraySource(np.zeros((len(labels), 4, 4, 3), np.uint8), labels)


# ---------------------------------------------------------------- 1. ssl.num_labeled range
@pytest.mark.parametrize("include, low, high", [(False, 8, 80), (True, 8, 95)])
def test_num_labeled_out_of_range_is_refused_before_anything_runs(include, low, high):
    """:tiny's synthetic train split is 96 images of 3 classes, B 8, mu 2: a labeled batch of 8
    at least; an unlabeled batch of 16 left (80 at most), or with the labeled images in the
    unlabeled stream one unlabeled image (95)."""
    c = TEAR_QUICK.get_config("tiny")
    c.ssl.include_labeled_in_unlabeled = include
    for n in (100000, 96, high + 1, low - 1, 2):
        c.ssl.num_labeled = n
        with pytest.raises(ConfigKeyError) as err:
            tear.check_config(c)
        msg = str(err.value)
        assert msg.startswith(f"config.ssl.num_labeled={n} ") and f"[{low}, {high}]" in msg, msg
        assert "96 images of 3 classes" in msg and "synthetic" in msg, msg
        assert "config.train.batch_size=8" in msg, msg
        assert ("config.ssl.mu x batch_size = 16" in msg) != include, msg
    for ok in (low, high):  # both ends stay valid
        c.ssl.num_labeled = ok
        tear.check_config(c)
    c.ssl.methods, c.ssl.num_labeled = ("supervised",), 95  # nothing draws unlabeled images
    tear.check_config(c)
    h = HTL_QUICK.get_config("tiny_ssl")  # HTL's semi-supervised task checks the same key
    h.ssl.num_labeled = 100000
    with pytest.raises(ConfigKeyError, match="config.ssl.num_labeled=100000 "):
        htl.check_config(h)


def test_num_labeled_out_of_range_found_in_the_data_names_key_and_size():
    train = _source([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])  # 10 images, 3 classes
    for n in (10, 11, 2):
        with pytest.raises(ConfigKeyError) as err:
            ssl_data.from_num_labeled(train, n, seed=0)
        msg = str(err.value)
        assert msg.startswith(f"config.ssl.num_labeled={n} ") and "[3, 9]" in msg, msg
        assert "10 images" in msg, msg
    labeled, unlabeled = ssl_data.from_num_labeled(train, 9, seed=0)
    assert (len(labeled), len(unlabeled)) == (9, 1)
    # a run's batches: B 4 labeled, mu 2 x 4 = 8 unlabeled left: only 2 fits, below B
    with pytest.raises(ConfigKeyError, match=r"too few for a labeled batch \(config.train."
                                             r"batch_size=4\).*unlabeled batch"):
        ssl_data.from_num_labeled(train, 4, seed=0, batch_size=4, unlabeled_batch=8)
    labeled, _ = ssl_data.from_num_labeled(train, 4, seed=0, batch_size=4, unlabeled_batch=8,
                                           include_labeled=True)
    assert len(labeled) == 4


def test_num_labeled_too_large_through_the_cli_is_one_config_error_line(tmp_path):
    """Data whose size only the file knows (a MedMNIST .npz of 20 training images): the CLI
    prints one `config error` line naming the key and the size, exit 2, no traceback."""
    arrays = {}
    for split, k in (("train", 20), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = np.full((k, 28, 28), 7, np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 3)[:, None]
    path = str(tmp_path / "mine.npz")
    np.savez(path, **arrays)
    proc = run_python(["-m", "jaxmed.main", "--config=configs/tear/quick.py:tiny",
                       f"--workdir={tmp_path / 'w'}", "--config.data.name=medmnist",
                       f"--config.data.root={path}", "--config.ssl.num_labeled=100000"],
                      check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(r"(config )?error: config.ssl.num_labeled=100000 ", lines[-1]), lines
    assert "20 images" in lines[-1], lines


# ------------------------------------------------------------------- 2. split lists' BOM
def test_split_lists_with_a_byte_order_mark_and_spaces_are_read(tmp_path):
    """Lists saved as 'UTF-8 with BOM' (Windows editors), CRLF ends and spaces around the
    fields: the first image is found under the root like the others."""
    root = str(tmp_path / "img")
    _images(os.path.join(root, "sub"), [f"ISIC_{i}.jpg" for i in range(6)])
    lab, unl = tmp_path / "Train2.txt", tmp_path / "Train_unl2.txt"
    lab.write_bytes("\ufeffISIC_0.jpg 0 0 1\r\n  ISIC_1.jpg\t1 0 0 \r\nISIC_5.jpg 0 1 0\r\n"
                    .encode("utf-8"))
    unl.write_bytes("\ufeffISIC_2.jpg 0 1 0\n ISIC_3.jpg 1 0 0\nISIC_4.jpg 0 0 1  \n"
                    .encode("utf-8"))
    labeled, unlabeled = ssl_data.from_lists(str(lab), str(unl), root, 3)
    np.testing.assert_array_equal(labeled.labels, [2, 0, 1])
    np.testing.assert_array_equal(unlabeled.labels, [1, 0, 2])
    assert [os.path.basename(f) for f in labeled.files] == ["ISIC_0.jpg", "ISIC_1.jpg",
                                                            "ISIC_5.jpg"]
    assert [os.path.basename(f) for f in unlabeled.files] == ["ISIC_2.jpg", "ISIC_3.jpg",
                                                              "ISIC_4.jpg"]
    assert labeled[0]["image"] == os.path.join(root, "sub", "ISIC_0.jpg")


# ------------------------------------------------------------ 3. a class with no sample
def test_a_class_without_a_labeled_sample_is_refused_naming_it(tmp_path):
    root = str(tmp_path / "img")
    _images(root, [f"ISIC_{i}.jpg" for i in range(6)])
    lab, unl = tmp_path / "Train2.txt", tmp_path / "Train_unl2.txt"
    # class 1 ('NV') only among the unlabeled images: no supervised signal for it
    lab.write_text("ISIC_0.jpg 1 0 0\nISIC_1.jpg 0 0 1\nISIC_2.jpg 1 0 0\n")
    unl.write_text("ISIC_3.jpg 0 1 0\nISIC_4.jpg 0 1 0\nISIC_5.jpg 1 0 0\n")
    names = ["MEL", "NV", "BCC"]
    with pytest.raises(ConfigKeyError) as err:
        ssl_data.from_lists(str(lab), str(unl), root, 3, class_names=names)
    msg = str(err.value)
    assert f"config.ssl.labeled_list={str(lab)!r}" in msg and "class 1 ('NV')" in msg, msg
    assert "class 0" not in msg and "class 2" not in msg, msg
    with pytest.raises(ConfigKeyError, match=r"class 1\b"):  # without names: the index
        ssl_data.from_lists(str(lab), str(unl), root, 3)
    # stratified: a class the train split lacks (a stated config.data.num_classes: 6 classes,
    # train holds 0, 1 and 3)
    train = _source([0, 1, 3, 0, 1, 3, 0, 1, 0, 1])
    six = [f"c{k}" for k in range(6)]
    with pytest.raises(ConfigKeyError) as err:
        ssl_data.from_num_labeled(train, 5, seed=0, class_names=six)
    msg = str(err.value)
    assert "class 2 ('c2'), class 4 ('c4'), class 5 ('c5')" in msg, msg
    assert "train split" in msg and "config.ssl.num_labeled" in msg, msg
    with pytest.raises(ConfigKeyError, match=r"class 2\b"):  # a gap shows without names
        ssl_data.from_num_labeled(train, 5, seed=0)
    labeled, _ = ssl_data.from_num_labeled(_source([0, 1, 2, 0, 1, 2, 1]), 4, seed=0,
                                           class_names=names)
    assert sorted(np.unique(labeled.labels)) == [0, 1, 2]


def test_split_lists_shorter_than_a_batch_are_refused_naming_the_list(tmp_path):
    root = str(tmp_path / "img")
    _images(root, [f"ISIC_{i}.jpg" for i in range(9)])
    lab, unl = tmp_path / "Train3.txt", tmp_path / "Train_unl6.txt"
    lab.write_text("ISIC_0.jpg 1 0 0\nISIC_1.jpg 0 1 0\nISIC_2.jpg 0 0 1\n")
    unl.write_text("".join(f"ISIC_{i}.jpg 1 0 0\n" for i in range(3, 9)))
    args = (str(lab), str(unl), root, 3)
    with pytest.raises(ConfigKeyError, match=r"config.ssl.labeled_list=.*Train3.txt' has 3 "
                                             r"images.*config.train.batch_size=4"):
        ssl_data.from_lists(*args, batch_size=4, unlabeled_batch=8)
    with pytest.raises(ConfigKeyError, match=r"config.ssl.unlabeled_list=.*Train_unl6.txt' has "
                                             r"6 images, fewer .* = 8\)"):
        ssl_data.from_lists(*args, batch_size=3, unlabeled_batch=8)
    # the unlabeled stream with the labeled images: 9 drawn, one batch of 8 fits
    labeled, unlabeled = ssl_data.from_lists(*args, batch_size=3, unlabeled_batch=8,
                                             include_labeled=True)
    assert (len(labeled), len(unlabeled)) == (3, 6)
    unl.write_text("")
    with pytest.raises(ConfigKeyError, match=r"Train_unl6.txt' has no image"):
        ssl_data.from_lists(*args)


def test_tear_refuses_the_data_fopro_kd_refuses(tmp_path):
    """A MedMNIST file whose train split holds classes 0-1 of a stated 6 (the data accepts it,
    config.data.num_classes=6): TEAR's split names the 4 classes without a labeled image."""
    from jaxmed import data as data_lib
    from jaxmed.methods.tear import run as tear_run

    arrays = {}
    for split, y in (("train", [0, 1] * 10), ("val", [0, 1, 5]), ("test", [0, 5, 3, 1])):
        arrays[f"{split}_images"] = np.full((len(y), 28, 28), 7, np.uint8)
        arrays[f"{split}_labels"] = np.asarray(y, np.int64)[:, None]
    np.savez(tmp_path / "mine.npz", **arrays)
    c = TEAR_QUICK.get_config("tiny")
    c.data.name, c.data.root, c.data.num_classes = "medmnist", str(tmp_path / "mine.npz"), 6
    ds = data_lib.build(c.data)
    assert ds.info.num_classes == 6
    with pytest.raises(ConfigKeyError) as err:
        tear_run.split(c, ds)
    msg = str(err.value)
    assert "class 2 ('class_2'), class 3 ('class_3'), class 4 ('class_4'), class 5" in msg, msg
    assert "(4 of 6 classes)" in msg, msg


def test_a_synthetic_class_with_no_training_image_is_refused_before_anything_runs():
    c = TEAR_QUICK.get_config("tiny")
    c.data.synthetic.num_train, c.data.synthetic.num_classes = 4, 5  # 4 images, 5 classes
    c.ssl.num_labeled = 3
    with pytest.raises(ConfigKeyError, match=r"class 4 \('class_4'\)"):
        tear.check_config(c)


# -------------------------------------------------------------- 4. HTL's first identification
def test_htl_cadence_past_the_run_end_is_refused_naming_both_keys():
    c = HTL_QUICK.get_config("tiny")  # 2 epochs of 64 // 16 = 4 steps
    for k in (2, 5):  # the first identification at epoch 2 = the last step: never
        c.htl.every_epochs = k
        with pytest.raises(ValueError) as err:
            htl.check_config(c)
        msg = str(err.value)
        assert f"config.htl.every_epochs={k}" in msg and "config.train.epochs=2" in msg, msg
    c.htl.every_epochs = 1
    htl.check_config(c)
    c.htl.methods, c.htl.every_epochs = ("baseline",), 5  # no identification asked for
    htl.check_config(c)
    # train.steps sets the length: 2 epochs are 8 steps, identification needs a step before
    c = HTL_QUICK.get_config("tiny")
    c.htl.every_epochs, c.train.steps = 2, 8
    with pytest.raises(ValueError, match=r"config.htl.every_epochs=2 .*config.train.steps=8"):
        htl.check_config(c)
    c.train.steps = 9
    htl.check_config(c)
    # semi-supervised: an epoch is a pass over TEAR's unlabeled stream, mu 2 x B 8 = 16 images
    # a step: the 84 unlabeled images (5 steps), or all 96 with the labeled ones (6 steps)
    for include, spe in ((False, 5), (True, 6)):
        c = HTL_QUICK.get_config("tiny_ssl")
        c.ssl.include_labeled_in_unlabeled = include
        c.train.steps = spe
        with pytest.raises(ValueError, match=rf"config.htl.every_epochs=1 \({spe} steps .*"
                                             rf"config.train.steps={spe}"):
            htl.check_config(c)
        c.train.steps = spe + 1
        htl.check_config(c)
    # data only the files size: refused where no data could identify before the end
    c = HTL_QUICK.get_config("tiny")
    c.data.name, c.data.root = "isic2018_seg", "/nonexistent"
    c.htl.every_epochs, c.train.steps = 3, 3
    with pytest.raises(ValueError, match=r"config.htl.every_epochs=3 .*config.train.steps=3"):
        htl.check_config(c)
    c.train.steps = 4  # identification after 3 epochs of >= 1 step: possible, the data decides
    htl.check_config(c)
