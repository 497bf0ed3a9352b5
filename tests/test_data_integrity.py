"""Data integrity before training: repeated image ids, ambiguous file names, malformed MedMNIST
files, splits with nothing usable, missing files in any split, paths leaving the root. Tables
are the real metadata rows of ../shared/samples and ../shared/splits."""

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxmed import data as data_lib
from jaxmed.data import inspect as inspect_cli
from jaxmed.data.datasets import tables
from jaxmed.data.datasets.chest import MIMIC_LT_CLASSES
from jaxmed.data.datasets.skin import biased_split_files
from jaxmed.data.images import ImageError
from jaxmed.data.pipeline import Preprocess
from jaxmed.data.sources import TableSource
from tests.data_helpers import copy, csv_rows, data_config, ham10000_folder, head_file, write_image


@pytest.fixture
def samples(shared_dir):
    return os.path.join(shared_dir, "samples")


def ham_split_of(ds) -> dict[str, str]:
    return {os.path.basename(f)[:-4]: s for s, src in ds.splits.items() for f in src.files}


# ------------------------------------------------------------------- repeated image ids
def test_ham10000_rows_repeated_under_new_lesion_ids_fail_naming_them(samples, tmp_path, capsys):
    rows = ham10000_folder(str(tmp_path), samples)
    meta = tmp_path / "HAM10000_metadata.csv"
    header = open(meta).readline()
    # the table: 30 rows repeated under new lesion ids (a lesion-wise split then puts
    # some of these images in train and in test)
    with open(meta, "a") as f:
        for k, r in enumerate(rows[:30]):
            f.write(",".join([f"HAM_9{k:06d}", *[r[c] for c in header.strip().split(",")[1:]]])
                    + "\n")
    with pytest.raises(tables.DataFormatError) as err:
        data_lib.build(data_config("ham10000", tmp_path))
    msg = str(err.value)
    assert "HAM10000_metadata.csv" in msg and "30 image id(s)" in msg
    assert f"{rows[0]['image_id']!r} on lines [2, 42]" in msg  # header = line 1
    assert inspect_cli.main(["--dataset", "ham10000", "--root", str(tmp_path)]) == 2
    assert rows[0]["image_id"] in capsys.readouterr().err


def _isic2019(samples, root):
    rows = csv_rows(copy(os.path.join(samples, "ISIC_2019_Training_GroundTruth.csv"),
                         str(root / "ISIC_2019_Training_GroundTruth.csv")))
    for i, r in enumerate(rows):
        write_image(str(root / "ISIC_2019_Training_Input" / (r["image"] + ".jpg")), i)
    return "isic2019", "ISIC_2019_Training_GroundTruth.csv", rows[7]["image"]


def _fitz(samples, root):
    rows = csv_rows(copy(os.path.join(samples, "fitzpatrick17k.csv"),
                         str(root / "fitzpatrick17k.csv")))
    for i, r in enumerate(rows):
        write_image(str(root / "data" / (r["md5hash"] + ".jpg")), i)
    return "fitzpatrick17k", "fitzpatrick17k.csv", rows[7]["md5hash"]


def _nih(samples, root):
    rows = csv_rows(copy(os.path.join(samples, "Data_Entry_2017.csv"),
                         str(root / "Data_Entry_2017.csv")))
    for i, r in enumerate(rows):
        write_image(str(root / "images_001" / "images" / r["Image Index"]), i, mode="L")
    return "nih_cxr14", "Data_Entry_2017.csv", rows[7]["Image Index"][:-4]


def _isic2018(samples, root):
    rows = csv_rows(copy(os.path.join(samples, "ISIC2018_Task3_Training_GroundTruth.csv"),
                         str(root / "ISIC2018_Task3_Training_GroundTruth.csv")))
    for i, r in enumerate(rows):
        write_image(str(root / "input" / (r["image"] + ".jpg")), i)
    return "isic2018", "ISIC2018_Task3_Training_GroundTruth.csv", rows[7]["image"]


@pytest.mark.parametrize("make", [_isic2018, _isic2019, _fitz, _nih])
def test_a_repeated_row_fails_in_every_adapter(samples, tmp_path, make):
    name, table, image_id = make(samples, tmp_path)
    data_lib.build(data_config(name, tmp_path))  # the real rows are unique
    lines = open(tmp_path / table).read().splitlines()
    with open(tmp_path / table, "a") as f:
        f.write(lines[8] + "\n")  # row 8 (line 9) again, as line 42
    with pytest.raises(tables.DataFormatError, match=re.escape(f"{image_id!r} on lines [9, 42]")):
        data_lib.build(data_config(name, tmp_path))


def test_an_image_in_two_split_files_fails_naming_the_splits(shared_dir, tmp_path):
    lists = tmp_path / "tear"
    for name in ("Train350.txt", "Val.txt", "Test.txt"):
        head_file(os.path.join(shared_dir, "splits", "tear", name), str(lists / name), 10)
    leaked = open(lists / "Train350.txt").readline()
    with open(lists / "Test.txt", "a") as f:
        f.write(leaked)  # a training image listed in the test split too
    for name in ("Train350.txt", "Val.txt", "Test.txt"):
        for i, line in enumerate(open(lists / name)):
            write_image(str(tmp_path / "images" / line.split()[0]), i)
    with pytest.raises(tables.DataFormatError, match=re.escape(
            f"{leaked.split()[0]} (train and test)")):
        data_lib.build(data_config("isic2018", tmp_path, lists / "Train350.txt"))
    with open(lists / "Train350.txt", "a") as f:
        f.write(leaked)  # and twice in one list (head_file kept 11 lines: no header here)
    with pytest.raises(tables.DataFormatError, match=re.escape(
            f"Train350.txt: image {leaked.split()[0]!r} is listed on lines 1 and 12")):
        data_lib.build(data_config("isic2018", tmp_path, lists / "Train350.txt"))


def test_reference_split_files_are_disjoint_and_unbiased_train_files_find_their_test(
        shared_dir):
    """The rule above holds for every shipped reference split (no legitimate repeats)."""
    fitz = os.path.join(shared_dir, "splits", "biaspruner", "fitz")
    files = biased_split_files(os.path.join(fitz, "fitz_unbiased_train_set_split.csv"))
    assert os.path.basename(files["test"]) == "fitz_unbiased_test_set.csv"
    ids = {s: [r["md5hash"] for r in csv_rows(p)] for s, p in files.items()}
    assert all(len(v) == len(set(v)) for v in ids.values())
    assert not (set(ids["train"]) & set(ids["test"])) and not (set(ids["val"]) & set(ids["test"]))


# --------------------------------------------------------------- one name, two places
def test_same_file_name_at_two_places_fails_naming_both(samples, tmp_path):
    rows = ham10000_folder(str(tmp_path), samples)
    real = tmp_path / "HAM10000_images_part_1" / (rows[0]["image_id"] + ".jpg")
    stray = tmp_path / "HAM10000_images_part_0" / real.name  # sorts first: it used to win
    stray.parent.mkdir()
    Image.new("RGB", (24, 20), (255, 255, 255)).save(stray)
    with pytest.raises(tables.DataFormatError) as err:
        data_lib.build(data_config("ham10000", tmp_path))
    assert str(stray) in str(err.value) and str(real) in str(err.value)
    os.remove(stray)
    (tmp_path / "unused").mkdir()
    write_image(str(tmp_path / "unused" / "ISIC_9999999.jpg"), 0)
    write_image(str(tmp_path / "unused2" / "ISIC_9999999.png"), 1)
    ds = data_lib.build(data_config("ham10000", tmp_path))  # a duplicate no row names is fine
    assert sum(len(s) for s in ds.splits.values()) == 40
    copy(str(tmp_path / "HAM10000_metadata.csv"), str(tmp_path / "old" / "HAM10000_metadata.csv"))
    with pytest.raises(tables.DataFormatError, match="2 files named 'HAM10000_metadata.csv'"):
        data_lib.build(data_config("ham10000", tmp_path))


# --------------------------------------------------------------------------- MedMNIST
def _npz(path, *, labels=None, **change):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 30), ("val", 10), ("test", 12)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 2 if labels is None else labels, (n, 1))
    arrays.update(change)
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("change, split, problem", [
    (dict(train_labels=np.array([[0], [1], [5]] * 10)), "train", r"train_labels\[2\] = 5 .*"
     r"\[0, 2\) for the 2 class names"),
    (dict(val_labels=np.array([[0], [-1]] * 5)), "val", r"val_labels\[1\] = -1"),
    (dict(test_labels=np.zeros((11, 1), np.int64)), "test", "12 images in test_images but 11"),
    (dict(val_images=np.zeros((10, 28, 28), np.float32)), "val", "dtype float32"),
    (dict(test_images=np.zeros((12, 32, 32), np.uint8)), "test", r"\(32, 32\) pixels"),
    (dict(train_labels=np.full((30, 1), 0.5)), "train", r"train_labels\[0\] = 0.5"),
])
def test_medmnist_problems_name_file_split_and_problem(tmp_path, change, split, problem):
    path = _npz(tmp_path / "pneumoniamnist.npz", **change)
    with pytest.raises(tables.DataFormatError, match=re.escape(f"{path} ({split} split)") +
                       ".*" + problem):
        data_lib.build(data_config("medmnist", path))


def test_medmnist_wrong_files_and_unknown_names(tmp_path):
    txt = tmp_path / "dermamnist.npz"
    txt.write_text("not an archive")
    with pytest.raises(tables.DataFormatError, match=f"{txt}: not a readable MedMNIST"):
        data_lib.build(data_config("medmnist", txt))
    np.save(tmp_path / "arr.npy", np.zeros(3))
    os.replace(tmp_path / "arr.npy", tmp_path / "breastmnist.npz")
    with pytest.raises(tables.DataFormatError, match="breastmnist.npz: .*single ndarray"):
        data_lib.build(data_config("medmnist", tmp_path / "breastmnist.npz"))
    chest = _npz(tmp_path / "chestmnist.npz", **{
        f"{s}_labels": np.zeros((n, 13), np.int64) for s, n in (("train", 30), ("val", 10),
                                                                 ("test", 12))})
    with pytest.raises(tables.DataFormatError, match=r"chestmnist.npz \(train split\).*\(N, 14\)"):
        data_lib.build(data_config("medmnist", chest))
    # a file of unknown name: as many classes as its largest label says, 0 .. 5 here
    ds = data_lib.build(data_config("medmnist", _npz(tmp_path / "mine.npz", labels=6)))
    assert ds.info.class_names == [f"class_{i}" for i in range(6)]


# --------------------------------------------------- nothing usable, missing in any split
@pytest.fixture
def ham(samples, tmp_path):
    ham10000_folder(str(tmp_path), samples)
    ds = data_lib.build(data_config("ham10000", tmp_path))
    assert all(len(s) for s in ds.splits.values())
    return tmp_path, ds


def test_skip_with_every_image_unreadable_stops_before_training(ham, samples):
    root, ds = ham
    real = open(os.path.join(samples, "ISIC_0024310.jpg"), "rb").read()
    for f in ds["test"].files:
        open(f, "wb").write(real[: len(real) // 3])  # truncated JPEGs
    with pytest.raises(ImageError, match=rf"ham10000 \(test\): no usable sample: all "
                                         rf"{len(ds['test'])} images are unreadable"):
        data_lib.build(data_config("ham10000", root, on_error="skip"))
    shutil.copy(os.path.join(samples, "ISIC_0024310.jpg"), ds["test"].files[-1])
    ok = data_lib.build(data_config("ham10000", root, on_error="skip"))  # one good image will do
    first = Preprocess(16, 3, on_error="skip")(0, ok["test"][0])
    assert not first["valid"]  # the others are still skipped while decoding
    for f in ds["train"].files:
        open(f, "wb").write(b"not an image")
    with pytest.raises(ImageError, match=rf"\(train\): no usable sample: all "
                                         rf"{len(ds['train'])} images"):
        data_lib.build(data_config("ham10000", root, on_error="skip"))


def test_missing_files_of_every_split_are_reported_together_at_build(ham):
    root, ds = ham
    gone_val, gone_test = ds["val"].files[0], ds["test"].files[-1]
    os.remove(gone_val)
    os.remove(gone_test)
    with pytest.raises(ImageError) as err:
        data_lib.build(data_config("ham10000", root))
    msg = str(err.value)
    for split, gone in (("val", gone_val), ("test", gone_test)):  # named by id, under root
        assert f"{split}: 1 (e.g. ['{root / os.path.basename(gone)}'])" in msg
    skipped = data_lib.build(data_config("ham10000", root, on_error="skip"))
    assert len(skipped["test"]) == len(ds["test"]) - 1
    for f in ds["test"].files[:-1]:
        os.remove(f)
    with pytest.raises(ImageError, match=rf"ham10000 \(test\): no usable sample: all "
                                         rf"{len(ds['test'])} rows skipped because their files "
                                         r"are missing"):
        data_lib.build(data_config("ham10000", root, on_error="skip"))


def test_missing_file_check_lists_each_folder_once(tmp_path, monkeypatch):
    files = [str(tmp_path / f"d{i % 3}" / f"{i}.png") for i in range(30)]
    for i, f in enumerate(files[:-2]):
        write_image(f, i, size=(2, 2))
    calls, stats = [], []
    real_listdir, real_exists = os.listdir, os.path.exists
    monkeypatch.setattr(os, "listdir", lambda p: calls.append(p) or real_listdir(p))
    monkeypatch.setattr(os.path, "exists", lambda p: stats.append(p) or real_exists(p))
    missing = TableSource(files, np.zeros(30, np.int64)).missing_files()
    monkeypatch.undo()
    assert missing == files[-2:] and len(calls) == 3 and not stats


# ---------------------------------------------------------------- paths leaving the root
@pytest.mark.parametrize("bad", ["../outside/x.jpg", "files/../../outside/x.jpg", "/etc/x.jpg"])
def test_mimic_paths_outside_the_root_are_refused_naming_the_row(tmp_path, bad):
    root = tmp_path / "mimic"
    write_image(str(tmp_path / "outside" / "x.jpg"), 0, mode="L")
    for split in ("train", "val", "test"):
        paths = [f"files/p10/p{split}{i}/s1/{i}.jpg" for i in range(3)]
        if split == "val":
            paths[1] = bad
        for i, p in enumerate(paths):
            if p != bad:
                write_image(str(root / p), i, mode="L")
        with open(root / f"miccai2023_mimic-cxr-lt_labels_{split}.csv", "w") as f:
            f.write(",".join(["path", *MIMIC_LT_CLASSES]) + "\n")
            f.writelines(",".join([p, *["1"] + ["0"] * (len(MIMIC_LT_CLASSES) - 1)]) + "\n"
                         for p in paths)
    with pytest.raises(tables.DataFormatError, match=re.escape(
            f"miccai2023_mimic-cxr-lt_labels_val.csv, line 3: path={bad!r} is not a path inside")):
        data_lib.build(data_config("mimic_cxr_lt", root))


# ------------------------------------------------- classes the training split never saw
def _labels_npz(path, train, val, test, *, width=None):
    """A MedMNIST-like .npz with the given label lists (multi-hot rows if `width`)."""
    arrays = {}
    for s, y in (("train", train), ("val", val), ("test", test)):
        y = np.asarray(y, np.int64)
        arrays[f"{s}_images"] = np.full((len(y), 28, 28), 7, np.uint8)
        arrays[f"{s}_labels"] = y if width else y[:, None]
    np.savez(path, **arrays)
    return str(path)


def test_a_class_only_val_or_test_holds_is_refused_naming_file_split_and_class(tmp_path):
    # unknown stem: the class count comes from the labels; test holds class 5 (3 times) and
    # class 3 (once), val class 4, train only 0-1: refused, not a silent 6-class head
    path = _labels_npz(tmp_path / "mine.npz", [0, 1] * 10, [0, 4, 1], [0, 5, 5, 1, 3, 5])
    with pytest.raises(ValueError) as err:
        data_lib.build(data_config("medmnist", path))
    msg = str(err.value)
    assert msg.startswith(f"medmnist ({path}): "), msg
    assert ("1 class(es) with sample(s) in the val split but none in train: class 4 "
            "('class_4'): 1; 2 class(es) with sample(s) in the test split but none in train: "
            "class 3 ('class_3'): 1, class 5 ('class_5'): 3;") in msg, msg
    assert "config.data.num_classes=6" in msg
    # stated by the user: accepted, with that many classes; a smaller count bounds the labels
    ds = data_lib.build(data_config("medmnist", path, num_classes=6))
    assert ds.info.num_classes == 6 and ds.info.class_counts.tolist() == [10, 10, 0, 0, 0, 0]
    assert data_lib.build(data_config("medmnist", path, num_classes=8)).info.num_classes == 8
    with pytest.raises(tables.DataFormatError, match=re.escape(
            f"{path} (val split): val_labels[1] = 4") + r".*config.data.num_classes=4"):
        data_lib.build(data_config("medmnist", path, num_classes=4))
    # a known dataset (fixed names): the val split's class 1 that train lacks
    known = _labels_npz(tmp_path / "pneumoniamnist.npz", [0] * 8, [1, 0, 1], [0, 0])
    with pytest.raises(ValueError, match=re.escape(known) + r".*in the val split but none in "
                                         r"train: class 1 \('pneumonia'\): 2"):
        data_lib.build(data_config("medmnist", known))
    with pytest.raises(ValueError, match=r"config.data.num_classes=3 but medmnist .*has 2 "):
        data_lib.build(data_config("medmnist", known, num_classes=3))
    assert data_lib.build(data_config("medmnist", known, num_classes=2)).info.num_classes == 2
    # multi-label: a finding with test positives and no training positive
    chest = _labels_npz(tmp_path / "chestmnist.npz", np.eye(14, dtype=int)[[0, 1, 2] * 3],
                        np.eye(14, dtype=int)[[0, 1]], np.eye(14, dtype=int)[[13, 13, 2]],
                        width=14)
    with pytest.raises(ValueError, match=r"test split but none in train: class 13 \('hernia'\)"
                                         r": 2"):
        data_lib.build(data_config("medmnist", chest))


def test_every_class_in_train_builds_as_before(tmp_path):
    path = _labels_npz(tmp_path / "mine.npz", [0, 1, 2, 2], [2, 0], [1, 1, 2])  # none missing
    assert data_lib.build(data_config("medmnist", path)).info.class_names == [
        "class_0", "class_1", "class_2"]
    path = _labels_npz(tmp_path / "other.npz", [0, 1, 3], [0], [1])  # 2 absent everywhere
    assert data_lib.build(data_config("medmnist", path)).info.num_classes == 4
    with pytest.raises(ValueError, match=r"config.data.num_classes=1: 0 .* or the number"):
        data_lib.build(data_config("medmnist", path, num_classes=1))


# ------------------------------------------------------------------------ Hyper-Kvasir
def test_hyper_kvasir_folders_that_are_no_finding_fail_naming_them(tmp_path):
    root = tmp_path / "labeled-images"
    layout = {("lower-gi-tract", "pathological-findings", "polyps"): 3,
              ("lower-gi-tract", "anatomical-landmarks", "cecum"): 2,
              ("upper-gi-tract", "pathological-findings", "esophagitis"): 4,  # not a finding
              ("upper-gi-tract", "anatomical-landmarks", "Pylorus-old"): 1}  # nor this
    for i, (parts, n) in enumerate(layout.items()):
        for j in range(n):
            write_image(str(root.joinpath(*parts, f"{parts[-1][:3]}{j:02d}-{i}.jpg")), j,
                        size=(4, 4))
    cfg = data_config("hyper_kvasir", tmp_path, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(tables.DataFormatError) as err:
        data_lib.build(cfg)
    msg = str(err.value)
    assert "5 images lie in 2 folder(s) that are not one of the 23 findings" in msg, msg
    for parts, n in (((*list(layout)[2],), 4), ((*list(layout)[3],), 1)):
        assert f"{root.joinpath(*parts)} ({n} images)" in msg, msg
    shutil.rmtree(root / "upper-gi-tract")  # only finding folders left: every image is read
    ds = data_lib.build(cfg)
    assert len(ds["train"]) == 5 and np.bincount(ds["train"].labels).max() == 3


# --------------------------------------------------------- spaces and BOMs in the tables
def test_csv_cells_are_stripped_and_a_bom_dropped(samples, tmp_path):
    rows = ham10000_folder(str(tmp_path), samples)
    meta = tmp_path / "HAM10000_metadata.csv"
    lines = open(meta).read().splitlines()
    padded = [lines[0]] + [", ".join(f" {c} " if i % 3 == 0 else c
                                     for c in line.split(",")) for i, line in
                           enumerate(lines[1:])]
    meta.write_text("\ufeff" + "\n".join(padded) + "\n", encoding="utf-8")
    ds = data_lib.build(data_config("ham10000", tmp_path))
    got = {os.path.basename(f)[:-4]: ds.info.class_names[y] for s in ds.splits.values()
           for f, y in zip(s.files, s.labels)}
    assert got == {r["image_id"]: r["dx"] for r in rows}
    sex = np.concatenate([data_lib.sources.source_attrs(s)["sex"] for s in ds.splits.values()])
    assert (sex >= 0).sum() == sum(r["sex"] in ("male", "female") for r in rows)


def test_a_bom_at_the_start_of_a_split_list_is_dropped(shared_dir, tmp_path):
    lists = tmp_path / "tear"
    for name in ("Train350.txt", "Val.txt", "Test.txt"):
        head_file(os.path.join(shared_dir, "splits", "tear", name), str(lists / name), 6)
    for name in ("Train350.txt", "Val.txt", "Test.txt"):
        for i, line in enumerate(open(lists / name)):
            if line.split():
                write_image(str(tmp_path / "images" / line.split()[0]), i, size=(4, 4))
    train = lists / "Train350.txt"
    first = open(train).readline().split()[0]
    train.write_text("\ufeff" + train.read_text())
    ds = data_lib.build(data_config("isic2018", tmp_path, train, num_classes=7))
    assert os.path.basename(ds["train"].files[0]) == first
