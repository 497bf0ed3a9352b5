"""Adapters parse the real metadata rows of ../shared/samples and ../shared/splits exactly;
class counts equal an independent count of the files."""

import collections
import os

import numpy as np
import pytest

from jaxmed import data as data_lib
from jaxmed.data.datasets import tables
from jaxmed.data.datasets.chest import NIH_LT_CLASSES, MIMIC_LT_CLASSES, read_nih_boxes
from jaxmed.data.images import ImageError, decode_image
from jaxmed.data.pipeline import Preprocess
from jaxmed.data.sources import source_attrs, source_labels
from tests.data_helpers import (copy, csv_rows, data_config, ham10000_folder, head_file,
                                write_image)


def counts_by_name(ds) -> collections.Counter:
    out = collections.Counter()
    for split in ds.splits.values():
        y = source_labels(split)
        if y.ndim == 2:
            for c, k in zip(ds.info.class_names, y.sum(0)):
                out[c] += int(k)
        else:
            for c, k in zip(ds.info.class_names, np.bincount(y, minlength=ds.info.num_classes)):
                if k:
                    out[c] += int(k)
    return +out


def total(ds) -> int:
    return sum(len(s) for s in ds.splits.values())


# ------------------------------------------------------------------------------- skin
def test_ham10000(shared_dir, tmp_path):
    rows = ham10000_folder(str(tmp_path), os.path.join(shared_dir, "samples"))
    ds = data_lib.build(data_config("ham10000", tmp_path))
    assert total(ds) == len(rows) == 40
    assert counts_by_name(ds) == collections.Counter(r["dx"] for r in rows)
    sex = np.concatenate([source_attrs(s)["sex"] for s in ds.splits.values()])
    assert collections.Counter(sex.tolist()) == {0: sum(r["sex"] == "male" for r in rows),
                                                 1: sum(r["sex"] == "female" for r in rows)}
    by_file = {os.path.basename(f)[:-4]: s for s, src in ds.splits.items() for f in src.files}
    for lesion in {r["lesion_id"] for r in rows}:  # lesion-wise split
        assert len({by_file[r["image_id"]] for r in rows if r["lesion_id"] == lesion}) == 1


def test_isic2018_ground_truth(shared_dir, tmp_path):
    gt = copy(os.path.join(shared_dir, "samples", "ISIC2018_Task3_Training_GroundTruth.csv"),
              str(tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"))
    rows = csv_rows(gt)
    for i, r in enumerate(rows):
        write_image(str(tmp_path / "ISIC2018_Task3_Training_Input" / (r["image"] + ".jpg")), i)
    ds = data_lib.build(data_config("isic2018", tmp_path))
    want = collections.Counter(next(c for c in ("AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC")
                                    if float(r[c]) == 1) for r in rows)
    assert counts_by_name(ds) == want and total(ds) == 40


def test_isic2018_tear_split_lists(shared_dir, tmp_path):
    lists = tmp_path / "tear"
    for name in ("Train350.txt", "Val.txt", "Test.txt"):
        head_file(os.path.join(shared_dir, "splits", "tear", name), str(lists / name), 24)
    names = {}
    for name in ("Train350.txt", "Val.txt", "Test.txt"):
        for line in open(lists / name):
            parts = line.split()
            if parts:
                names[parts[0]] = parts[1:]
    for i, n in enumerate(names):
        write_image(str(tmp_path / "images" / n), i)
    # 24 rows a list: val / test hold classes these train rows lack, so the count is stated
    ds = data_lib.build(data_config("isic2018", tmp_path, lists / "Train350.txt", num_classes=7))
    assert ds.info.class_names == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    for split, name in (("train", "Train350.txt"), ("val", "Val.txt"), ("test", "Test.txt")):
        onehots = [list(map(int, line.split()[1:])) for line in open(lists / name) if line.strip()]
        np.testing.assert_array_equal(np.bincount(source_labels(ds[split]), minlength=7),
                                      np.sum(onehots, axis=0))


def test_isic2019_ground_truth_and_fopro_splits(shared_dir, tmp_path):
    gt = copy(os.path.join(shared_dir, "samples", "ISIC_2019_Training_GroundTruth.csv"),
              str(tmp_path / "ISIC_2019_Training_GroundTruth.csv"))
    split_dir = tmp_path / "fopro"
    for s in ("train", "val", "test"):
        src = os.path.join(shared_dir, "splits", "fopro_kd", f"{s}_skin1_0.002.csv")
        if not os.path.exists(src):
            src = os.path.join(shared_dir, "splits", "fopro_kd", "test_skin1_0.002.csv")
        head_file(src, str(split_dir / f"{s}_skin1_0.002.csv"), 20)
    images = {r["image"] for r in csv_rows(gt)}
    for s in ("train", "val", "test"):
        images |= {r["image"] for r in csv_rows(str(split_dir / f"{s}_skin1_0.002.csv"))}
    for i, name in enumerate(sorted(images)):
        write_image(str(tmp_path / "ISIC_2019_Training_Input" / (name + ".jpg")), i)
    ds = data_lib.build(data_config("isic2019", tmp_path))
    rows = csv_rows(gt)
    want = collections.Counter(next(c for c in ds.info.class_names if float(r[c]) == 1)
                               for r in rows)
    assert counts_by_name(ds) == want
    fo = data_lib.build(data_config("isic2019", tmp_path, split_dir / "train_skin1_0.002.csv",
                                    num_classes=8))  # 20 rows: val / test classes train lacks
    for s in ("train", "val", "test"):
        want = np.bincount([int(r["finding"]) for r in
                            csv_rows(str(split_dir / f"{s}_skin1_0.002.csv"))], minlength=8)
        np.testing.assert_array_equal(np.bincount(source_labels(fo[s]), minlength=8), want)


def test_fitzpatrick17k(shared_dir, tmp_path):
    rows = csv_rows(copy(os.path.join(shared_dir, "samples", "fitzpatrick17k.csv"),
                         str(tmp_path / "fitzpatrick17k.csv")))
    for i, r in enumerate(rows):
        write_image(str(tmp_path / "data" / "finalfitz17k" / (r["md5hash"] + ".jpg")), i)
    ds = data_lib.build(data_config("fitzpatrick17k", tmp_path))
    assert counts_by_name(ds) == collections.Counter(r["three_partition_label"] for r in rows)
    skin = np.concatenate([source_attrs(s)["skin_type"] for s in ds.splits.values()])
    assert collections.Counter(skin.tolist()) == collections.Counter(
        int(r["fitzpatrick_scale"]) for r in rows)


FITZ = ("three_partition_label", ("benign", "malignant"))
NIH = ("FindingLabels", ("No Finding", "Pneumothorax"))


@pytest.mark.parametrize("folder, name, dataset, label, attr_col, attr", [
    ("fitz", "fitz_biased_train_set_split.csv", "fitzpatrick17k", FITZ, "fitzpatrick",
     "skin_group"),
    ("fitz", "flipped_total_biased_train_set_split.csv", "fitzpatrick17k", FITZ, "fitzpatrick",
     "skin_group"),
    ("GbP", "total_biased_train_set_split.csv", "nih_cxr14", NIH, "PatientGender", "sex"),
    ("GbP", "flipped_total_biased_train_set_split.csv", "nih_cxr14", NIH, "PatientGender", "sex"),
    ("age_ISIC_2020", "agetotal_biased_train_set_split.csv", "isic2020", ("target", ("0", "1")),
     None, "age_group"),
])
def test_biaspruner_splits(shared_dir, tmp_path, folder, name, dataset, label, attr_col, attr):
    from jaxmed.data.datasets.skin import biased_split_files

    src_dir = os.path.join(shared_dir, "splits", "biaspruner", folder)
    files = biased_split_files(os.path.join(src_dir, name))
    local = {s: head_file(p, str(tmp_path / "splits" / os.path.basename(p)), 30)
             for s, p in files.items()}
    ids = set()
    for p in local.values():
        for r in csv_rows(p):
            ids.add(r.get("md5hash") or r.get("ImageIndex") or r.get("image_name"))
    ext = ".png" if folder == "GbP" else ".jpg"
    for i, n in enumerate(sorted(ids)):
        write_image(str(tmp_path / "images" / (os.path.splitext(n)[0] + ext)), i)
    ds = data_lib.build(data_config(dataset, tmp_path, local["train"]))
    assert ds.info.num_classes == 2
    label_col, classes = label
    for s, p in local.items():
        rows = csv_rows(p)
        want = [sum(r[label_col] == c for r in rows) for c in classes]
        assert np.bincount(source_labels(ds[s]), minlength=2).tolist() == want
        values = source_attrs(ds[s])[attr]
        if attr_col == "PatientGender":
            assert (values == 1).sum() == sum(r[attr_col] == "F" for r in rows)
        elif attr_col:
            assert (values == 1).sum() == sum(r[attr_col] == "1" for r in rows)
        else:
            col = "age" if "age" in rows[0] and rows[0]["age"] else "age_approx"
            assert (values == 1).sum() == sum(r[col] == "1" for r in rows)


def test_gbp_14_class_files_are_resplit_by_patient(shared_dir, tmp_path):
    src_dir = os.path.join(shared_dir, "splits", "biaspruner", "GbP")
    local = {s: head_file(os.path.join(src_dir, f"{s}.csv"), str(tmp_path / f"{s}.csv"), 40)
             for s in ("train", "val", "test")}
    rows = [r for p in local.values() for r in csv_rows(p)]
    for i, r in enumerate(rows):
        write_image(str(tmp_path / "images" / r["ImageIndex"]), i, mode="L")
    ds = data_lib.build(data_config("nih_cxr14", tmp_path, local["train"]))
    assert counts_by_name(ds) == collections.Counter(r["FindingLabels"] for r in rows)
    by_file = {os.path.basename(f): s for s, src in ds.splits.items() for f in src.files}
    patients = collections.defaultdict(set)
    for r in rows:
        patients[r["PatientID"]].add(by_file[r["ImageIndex"]])
    assert all(len(v) == 1 for v in patients.values())


# ------------------------------------------------------------------------------ chest
def test_nih_cxr14_data_entry(shared_dir, tmp_path):
    rows = csv_rows(copy(os.path.join(shared_dir, "samples", "Data_Entry_2017.csv"),
                         str(tmp_path / "Data_Entry_2017.csv")))
    for i, r in enumerate(rows):
        if r["Image Index"] == "00000001_000.png":
            copy(os.path.join(shared_dir, "samples", "00000001_000.png"),
                 str(tmp_path / "images_001" / "images" / r["Image Index"]))
        else:
            write_image(str(tmp_path / "images_001" / "images" / r["Image Index"]), i,
                        mode="I;16" if i % 3 == 0 else "L")
    test_patients = {"11", "13"}
    with open(tmp_path / "test_list.txt", "w") as f:
        f.writelines(r["Image Index"] + "\n" for r in rows if r["Patient ID"] in test_patients)
    # 40 rows: findings of the test patients that train lacks, so the count is stated
    ds = data_lib.build(data_config("nih_cxr14", tmp_path, num_classes=14))
    want = collections.Counter(f for r in rows for f in r["Finding Labels"].split("|")
                               if f != "No Finding")
    assert counts_by_name(ds) == want
    assert len(ds["test"]) == sum(r["Patient ID"] in test_patients for r in rows)
    ages = np.concatenate([source_attrs(s)["age_group"] for s in ds.splits.values()])
    assert (ages >= 0).all() and ds.info.multi_label and ds.info.channels == 1
    rec = ds["test"][0]
    img = Preprocess(32, 3)(0, rec)["image"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_nih_boxes(shared_dir):
    path = os.path.join(shared_dir, "samples", "BBox_List_2017.csv")
    boxes = read_nih_boxes(path)
    rows = open(path).read().strip().splitlines()[1:]
    assert sum(len(v) for v in boxes.values()) == len(rows) == 40
    first = rows[0].split(",")
    assert boxes[first[0]][0][1:] == tuple(float(v) for v in first[2:6])


def _lt_csv(path, id_col, classes, n, rng, extra=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    base = {"train": 0, "val": 100, "test": 200}[str(path).rsplit("_", 1)[1][:-4]]
    with open(path, "w") as f:
        f.write(",".join([id_col, *extra, *classes]) + "\n")
        rows = []
        for i in range(base, base + n):
            y = (rng.random(len(classes)) < 0.3).astype(int)
            name = f"{i:08d}_000.png" if id_col == "id" else f"files/p10/p{i}/s{i}/{i}.jpg"
            rows.append((name, y))
            f.write(",".join([name, *[str(i)] * len(extra), *map(str, y)]) + "\n")
    return rows


def test_nih_cxr_lt_and_mimic_cxr_lt_label_files(tmp_path):
    rng = np.random.default_rng(0)
    for name, id_col, classes, extra in (
            ("nih-cxr-lt", "id", NIH_LT_CLASSES, ("subj_id",)),
            ("mimic-cxr-lt", "path", MIMIC_LT_CLASSES, ("subject_id", "study_id"))):
        root = tmp_path / name
        want = np.zeros(len(classes))
        for split in ("train", "val", "test"):
            rows = _lt_csv(root / f"miccai2023_{name}_labels_{split}.csv", id_col, classes, 8,
                           rng, extra)
            for i, (n, y) in enumerate(rows):
                path = root / "images" / n if id_col == "id" else root / n
                if not path.exists():
                    write_image(str(path), i, mode="L")
                want += y
        ds = data_lib.build(data_config(name.replace("-", "_"), root,
                                        num_classes=len(classes)))  # 8 rows a split
        assert ds.info.class_names == classes and ds.info.multi_label
        np.testing.assert_array_equal(sum(source_labels(s).sum(0) for s in ds.splits.values()),
                                      want)


# ------------------------------------------------------------------- other formats
def test_isic2018_segmentation_masks(shared_dir, tmp_path):
    copy(os.path.join(shared_dir, "samples", "ISIC_0000000_segmentation.png"),
         str(tmp_path / "gt" / "ISIC_0000000_segmentation.png"))
    write_image(str(tmp_path / "in" / "ISIC_0000000.jpg"), 0, size=(1022, 767))
    ds = data_lib.build(data_config("isic2018_seg", tmp_path, val_fraction=0.0,
                                    test_fraction=0.0))
    plain = Preprocess(256, 3)(0, ds["train"][0])
    assert plain["image"].shape == (256, 256, 3) and plain["mask"].shape == (256, 256)
    assert set(np.unique(plain["mask"])) == {0, 255}  # nearest resize keeps the mask binary
    flips = 0
    for pos in range(6):  # geometric augmentation moves image and mask together
        el = Preprocess(256, 3, "flip", seed=1)(pos, ds["train"][0])
        flipped = np.array_equal(el["image"], plain["image"][:, ::-1])
        assert flipped or np.array_equal(el["image"], plain["image"])
        np.testing.assert_array_equal(el["mask"], plain["mask"][:, ::-1] if flipped
                                      else plain["mask"])
        flips += flipped
    assert 0 < flips < 6


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 30), ("val", 10), ("test", 12)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    ds = data_lib.build(data_config("medmnist", tmp_path / "pneumoniamnist.npz"))
    assert ds.info.class_names == ["normal", "pneumonia"] and ds.info.channels == 1
    assert data_lib.image_size(data_config("medmnist", ""), ds.info) == 28
    np.testing.assert_array_equal(np.bincount(source_labels(ds["test"])),
                                  np.bincount(arrays["test_labels"][:, 0]))
    bad = dict(arrays)
    del bad["val_labels"]
    np.savez(tmp_path / "broken.npz", **bad)
    with pytest.raises(tables.DataFormatError, match="val_labels"):
        data_lib.build(data_config("medmnist", tmp_path / "broken.npz"))


# ---------------------------------------------------------------------------- bad input
def test_csv_without_expected_columns_names_them(shared_dir, tmp_path):
    rows = ham10000_folder(str(tmp_path), os.path.join(shared_dir, "samples"))
    with open(tmp_path / "HAM10000_metadata.csv", "w") as f:
        f.write("lesion_id,image_id,diagnosis,age,sex\n")
        f.writelines(f"{r['lesion_id']},{r['image_id']},{r['dx']},{r['age']},{r['sex']}\n"
                     for r in rows)
    with pytest.raises(tables.DataFormatError, match=r"HAM10000_metadata.csv.*missing \['dx'\].*"
                                                     r"diagnosis"):
        data_lib.build(data_config("ham10000", tmp_path))


def test_unknown_label_names_the_line(shared_dir, tmp_path):
    rows = ham10000_folder(str(tmp_path), os.path.join(shared_dir, "samples"))
    text = open(tmp_path / "HAM10000_metadata.csv").read().replace(
        f"{rows[4]['image_id']},bkl", f"{rows[4]['image_id']},melanoma")
    open(tmp_path / "HAM10000_metadata.csv", "w").write(text)
    with pytest.raises(tables.DataFormatError, match="line 6.*melanoma"):
        data_lib.build(data_config("ham10000", tmp_path))


def test_missing_image_fails_or_is_skipped(shared_dir, tmp_path):
    rows = ham10000_folder(str(tmp_path), os.path.join(shared_dir, "samples"))
    gone = tmp_path / "HAM10000_images_part_2" / (rows[1]["image_id"] + ".jpg")
    os.remove(gone)
    with pytest.raises(ImageError, match=rows[1]["image_id"]):
        data_lib.build(data_config("ham10000", tmp_path))
    ds = data_lib.build(data_config("ham10000", tmp_path, on_error="skip"))
    assert total(ds) == 39


def test_corrupt_jpeg_fails_naming_it_or_is_skipped(shared_dir, tmp_path):
    rows = ham10000_folder(str(tmp_path), os.path.join(shared_dir, "samples"),
                           real_jpeg_for="ISIC_0027419")
    path = tmp_path / "HAM10000_images_part_1" / "ISIC_0027419.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated JPEG
    rec = {"image": str(path), "label": 0, "attrs": {}, "index": 0}
    with pytest.raises(ImageError, match="ISIC_0027419.jpg"):
        Preprocess(32, 3)(0, rec)
    el = Preprocess(32, 3, on_error="skip")(0, rec)
    assert not el["valid"] and el["image"].shape == (32, 32, 3)
    assert len(rows) == 40


def test_image_modes_are_converted_not_misread(tmp_path, shared_dir):
    x16 = np.array([[0, 256, 65535], [1024, 32768, 512]], np.uint16)
    from PIL import Image
    Image.fromarray(x16).save(tmp_path / "a.png")
    got = decode_image(str(tmp_path / "a.png"), channels=1)
    np.testing.assert_array_equal(got[..., 0], (x16 >> 8).astype(np.uint8))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    assert decode_image(str(tmp_path / "b.png"))[0, 0].tolist() == [200, 0, 0]
    xray = decode_image(os.path.join(shared_dir, "samples", "00000001_000.png"), channels=3)
    assert xray.shape == (1024, 1024, 3) and (xray[..., 0] == xray[..., 2]).all()
    jpg = decode_image(os.path.join(shared_dir, "samples", "ISIC_0024310.jpg"), size=(224, 224))
    assert jpg.shape == (224, 224, 3) and 40 < jpg.mean() < 220
    with pytest.raises(ImageError, match="nope.png"):
        decode_image(str(tmp_path / "nope.png"))
    rec = {"image": os.path.join(shared_dir, "samples", "ISIC_0024310.jpg"), "label": 0,
           "attrs": {}, "index": 0}
    crops = [Preprocess(224, 3, "rrc(0.08)|flip")(i, rec)["image"] for i in range(2)]
    assert crops[0].shape == (224, 224, 3) and not np.array_equal(crops[0], crops[1])


# --------------------------------------------------------- integer images' bit depth
def _png16(path, values, sbit=None):
    from PIL import Image, PngImagePlugin

    info = None
    if sbit is not None:
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)
    return str(path)


def test_12_bit_data_in_a_16_bit_png_is_scaled_by_its_depth(tmp_path):
    rng = np.random.default_rng(3)
    x12 = np.concatenate([np.linspace(0, 4095, 256).round().reshape(8, 32),  # 12-bit ramp
                          rng.integers(0, 4096, (8, 32))]).astype(np.uint16)
    got = decode_image(_png16(tmp_path / "xray.png", x12), channels=1)[..., 0]
    np.testing.assert_array_equal(got, (x12 >> 4).astype(np.uint8))  # not x12 >> 8 (0..15)
    assert got.min() == 0 and got.max() == 255
    # sBIT decides when present: 10-bit-looking data marked 12-bit stays dim; the bytes path
    x10 = (x12 // 4).astype(np.uint16)
    marked = open(_png16(tmp_path / "m.png", x10, sbit=12), "rb").read()
    np.testing.assert_array_equal(decode_image(marked, channels=1)[..., 0], x10 >> 4)
    np.testing.assert_array_equal(decode_image(_png16(tmp_path / "u.png", x10), channels=1)
                                  [..., 0], x10 >> 2)
    with pytest.raises(ImageError, match=r"lie.png: its PNG sBIT chunk says 10 significant "
                                         r"bits but a value reaches 4095"):
        decode_image(_png16(tmp_path / "lie.png", x12, sbit=10), channels=1)
    from PIL import Image

    x8 = rng.integers(0, 256, (6, 5)).astype(np.uint8)  # an 8-bit PNG is unchanged
    Image.fromarray(x8, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "l.png"), channels=1)[..., 0], x8)
    small = np.array([[0, 3], [200, 255]], np.uint16)  # 8-bit values in a 16-bit file
    np.testing.assert_array_equal(decode_image(_png16(tmp_path / "s.png", small), channels=1)
                                  [..., 0], small)


def test_synthetic_imbalance_out_of_range_names_the_key():
    for key, bad in (("imbalance", 1.5), ("imbalance", 0.0), ("imbalance", -0.2),
                     ("test_imbalance", 2.0)):
        cfg = data_lib.default_config()
        cfg.synthetic[key] = bad
        with pytest.raises(ValueError, match=rf"^config.data.synthetic.{key}={bad!r}: .*\(0, 1\]"):
            data_lib.check_config(cfg)
        with pytest.raises(ValueError, match=rf"config.data.synthetic.{key}="):
            data_lib.build(cfg)
    cfg = data_lib.default_config()
    cfg.synthetic.imbalance = 0.01
    data_lib.check_config(cfg)


def test_a_header_claiming_a_huge_image_is_named_and_skippable(tmp_path):
    """A corrupt header (PIL's decompression-bomb guard) is an ImageError like any other
    unreadable file: named, and skipped with on_error='skip' (it used to escape both)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    path = tmp_path / "huge_header.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000,
                                                                        30000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    rec = {"image": str(path), "label": 0, "attrs": {}, "index": 0}
    with pytest.raises(ImageError, match="huge_header.png"):
        Preprocess(8, 1)(0, rec)
    assert not Preprocess(8, 1, on_error="skip")(0, rec)["valid"]
