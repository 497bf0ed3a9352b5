"""FoPro-KD's steps, teachers, data and report: the teacher stays bitwise frozen and out of the
optimizer state and checkpoint, every method compiles once, teachers load from a jaxmed workdir
and a PyTorch file, Hyper-Kvasir and the ISIC 2019 long-tailed splits read right, head / medium
/ tail accuracy matches a numpy reference, and the :tiny comparison writes its table and runs
only a new method's sub-run when one is added. Teachers of either channel count serve students
of either; class names, teacher identity, the files read back and the probe stage's NaN guard
are checked (issues 22 and 24)."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed import data as data_lib
from jaxmed import fourier, losses, metrics
from jaxmed.config_check import sibling
from jaxmed.data.datasets.tables import DataFormatError
from jaxmed.methods import fopro_kd
from jaxmed.methods.fopro_kd import objectives, run, step, teachers
from jaxmed.train import comparison, sharding
from jaxmed.train.checkpoint import Checkpointer
from tests.conftest import REPO
from tests.data_helpers import write_image

SAMPLES = "/work/shared/samples"
SPLITS = "/work/shared/splits/fopro_kd"


# the frozen teacher's (logits, features), compiled once per teacher model (eager is slower)
teacher_outputs = jax.jit(step.teacher_outputs, static_argnums=(0, 1))


def tiny_config(**kd):
    c = sibling(os.path.join(REPO, "configs", "fopro_kd", "quick.py"), "quick").get_config("tiny")
    c.kd.update(kd)
    return c


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny synthetic long tail and a teacher trained by the quick configs' teacher stage."""
    workdir = str(tmp_path_factory.mktemp("fopro"))
    config = tiny_config()
    teacher_dir = teachers.train_teacher_stage(config, workdir)
    ds = data_lib.build(config.data)
    teacher = teachers.from_workdir(teacher_dir, config.data.image_size)
    return {"config": config, "workdir": workdir, "ds": ds, "teacher": teacher,
            "mesh": sharding.make_mesh()}


@pytest.fixture(scope="module")
def gray_teacher(tmp_path_factory):
    """A 1-channel teacher workdir: the tiny teacher stage on the synthetic images decoded
    grayscale (config.data.channels=1), as a teacher trained on a grayscale MedMNIST file."""
    config = tiny_config()
    config.data.channels = 1
    return teachers.train_teacher_stage(config, str(tmp_path_factory.mktemp("gray")))


@pytest.fixture(scope="module")
def torch_r18(tmp_path_factory):
    """A torchvision-layout ResNet-18 with a 4-class head (the tiny data's count) in a .pth."""
    torch = pytest.importorskip("torch")
    from tests.torch_reference import BasicBlock, ResNet, randomize_bn

    torch.manual_seed(0)
    net = randomize_bn(ResNet(BasicBlock, [2, 2, 2, 2], 4)).eval()
    path = str(tmp_path_factory.mktemp("r18") / "r18.pth")
    torch.save({"state_dict": net.state_dict()}, path)
    return net, path


def _batches(env, n, channels=3):
    from jaxmed.data.pipeline import Preprocess, train_stream
    c = env["config"]
    stream = train_stream(env["ds"]["train"], global_batch=c.train.batch_size,
                          preprocess=Preprocess(16, channels, "flip", 0), seed=0, num_epochs=1)
    return [sharding.to_global(next(stream), env["mesh"]) for _ in range(n)]


def _test_images(env, n=4):
    """n unaugmented test images as uint8 RGB and as jaxmed decodes them grayscale (PIL 'L')."""
    from PIL import Image

    from jaxmed.data.pipeline import Preprocess
    src = env["ds"]["test"]
    rgb = np.stack([Preprocess(16, 3, "", 0)(i, src[i])["image"] for i in range(n)])
    gray = np.stack([np.asarray(Image.fromarray(x).convert("L"))[..., None] for x in rgb])
    return rgb, gray


def test_teacher_from_workdir_is_the_trained_model(env):
    t = env["teacher"]
    saved = teachers.build.load_workdir_variables(t.source)
    assert t.num_classes == 4 and t.feature_dim == 16  # resnet8 width 4: 16-d pooled features
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(t.variables)):
        np.testing.assert_array_equal(a, b)


def test_teacher_frozen_one_compile_and_only_student_and_prompt_saved(env, tmp_path):
    batches = _batches(env, 3)
    for method in ("ldam_drw", "hinton_kd", "ekd_fpg_adv"):  # student only, logits, prompt
        built = run.build_method(env["config"], method, 0, env["ds"], env["teacher"],
                                 env["mesh"])
        teacher = built.teacher
        if built.setup.teacher_logits == "probe":  # (not here: the teacher has the 4 classes)
            teacher = {**teacher, "probe": objectives.init_probe(16, 4)}
        before = jax.device_get(teacher)
        student0 = jax.device_get(built.state.params["student"])
        state = built.state
        for b in batches:
            state, m = built.train_step(state, teacher, b)
        assert built.train_step._cache_size() == 1, method  # one compile per method
        assert np.isfinite(float(m["loss"])), method
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(teacher))):
            assert np.array_equal(a, b), f"{method} changed the teacher"
        moved = [not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(student0), jax.tree.leaves(jax.device_get(state.params["student"])))]
        assert any(moved), method
        want = {"student", "prompt"} if method in step.PROMPTED else {"student"}
        assert set(state.params) == want
        assert set(state.opt_state) == ({"student", "prompt"} if method == "ekd_fpg_adv"
                                        else {"student"})
        if method == "ekd_fpg_adv":  # the adversarial prompt moved off the identity
            assert float(jnp.abs(state.params["prompt"]["log_mask"]).max()) > 0
            ck = Checkpointer(str(tmp_path / "ck"), keep=1)
            ck.save(3, state)
            ck.wait()
            raw, _ = ck.restore_raw(3)
            ck.close()
            assert set(raw["params"]) == {"student", "prompt"}
            n_teacher = len(jax.tree.leaves(before))
            assert len(jax.tree.leaves(raw)) == len(jax.tree.leaves(jax.device_get(state)))
            shapes = {tuple(x.shape) for x in jax.tree.leaves(raw)}
            t_only = {tuple(x.shape) for x in jax.tree.leaves(before["variables"])} - {
                tuple(x.shape) for x in jax.tree.leaves(jax.device_get(state))}
            assert n_teacher > 0 and not (t_only & shapes)


def test_ekd_step_loss_is_the_reference_ekd_loss():
    rng = np.random.default_rng(0)
    out = {"logits": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
           "proj": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
           "proj_logits": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    t = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    labels = jnp.asarray([0, 2, 1, 0, 0])
    counts = np.array([30, 5, 2])
    setup = step.Setup("ekd", None, None, None, counts, w_kd=3.0)
    per, _ = step.per_sample_loss(setup, out, labels, 0, t_feats=t)
    ref, _ = objectives.ekd_loss(out, labels, t, counts, w_kd=3.0)
    np.testing.assert_allclose(float(jnp.mean(per)), float(ref), rtol=1e-6)
    # feature KD differs only in the KD term: L2 instead of 2 - 2 cos
    fk, _ = step.per_sample_loss(step.Setup("feature_kd", None, None, None, counts,
                                            w_feature=2.0), out, labels, 0, t_feats=t)
    diff = np.asarray(fk - per)
    np.testing.assert_allclose(diff, 2.0 * np.mean((np.asarray(out["proj"]) - np.asarray(t))
                                                   ** 2, -1) - 3.0 * np.asarray(
        losses.cosine_kd(out["proj"], t)), rtol=1e-5, atol=1e-6)


def test_teacher_from_torch_file_matches_torch(torch_r18):
    """Features and logits as torch's: the .pth's own 4-class head is kept (not replaced by a
    random 1000-class one), and on 1-channel data the RGB teacher sees the gray image repeated
    and ImageNet-normalised per channel, as torchvision teachers on X-rays are fed."""
    import torch

    from jaxmed.data import augment

    net, path = torch_r18
    teacher = teachers.from_torch(path, "resnet18", 32)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)

    def torch_out(x):
        with torch.no_grad():
            h = torch.from_numpy(x.transpose(0, 3, 1, 2))
            h = torch.nn.functional.max_pool2d(torch.relu(net.bn1(net.conv1(h))), 3, 2, 1)
            for i in range(4):
                h = getattr(net, f"layer{i + 1}")(h)
            return net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy(), h.mean((2, 3)).numpy()

    want_logits, want = torch_out(x)
    logits, got = teacher_outputs(teacher.model, 32, teacher.variables, jnp.asarray(x))
    assert teacher.feature_dim == 512 and teacher.channels == 3
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    assert teacher.num_classes == 4  # its own head: the same logits as torch
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=1e-4)
    # a 1-channel student: gray uint8 -> the student's normalisation -> the teacher's own view
    gray = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1)).astype(np.uint8)
    on_gray = teacher.for_channels(1)
    assert on_gray.channels == 3 and teacher.for_channels(3) is teacher
    logits1, got1 = teacher_outputs(on_gray.model, 32, on_gray.variables,
                                         augment.normalize(gray))
    ref_logits, ref = torch_out(np.array(augment.normalize(np.repeat(gray, 3, -1))))
    np.testing.assert_allclose(np.asarray(got1), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logits1), ref_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="teacher_model"):
        teachers.from_torch(path, "resnet99", 32)
    with pytest.raises(ValueError, match=r"config.kd.teacher_classes has 3 names.*4 outputs"):
        teachers.from_torch(path, "resnet18", 32, class_names=("a", "b", "c"))


def test_gray_teacher_serves_gray_and_rgb_students(env, gray_teacher):
    """A 1-channel teacher workdir (issue 24: conv1 probed with 3 channels crashed) takes its
    channels, image size and class names from its workdir, and serves a 1-channel student (its
    own view) and a 3-channel one (the luminance jaxmed's decoder would give it); the RGB
    teacher serves a 1-channel student with the gray image repeated."""
    from jaxmed.data import augment

    t = teachers.from_workdir(gray_teacher)
    assert (t.channels, t.image_size, t.num_classes) == (1, 16, 4)
    assert t.class_names == ("class_0", "class_1", "class_2", "class_3")
    rgb, gray = _test_images(env)
    own = np.asarray(teacher_outputs(t.model, 16, t.variables, augment.normalize(gray))[1])
    on_gray = t.for_channels(1)
    assert on_gray is t
    on_rgb = t.for_channels(3)
    # the adapted view is the one its own pipeline gives (up to PIL's rounding to uint8)
    np.testing.assert_allclose(np.asarray(on_rgb.model.adapt(augment.normalize(rgb))),
                               np.asarray(augment.normalize(gray)), atol=0.51 / 255 / 0.226)
    got = np.asarray(teacher_outputs(on_rgb.model, 16, on_rgb.variables,
                                          augment.normalize(rgb))[1])
    np.testing.assert_allclose(got, own, atol=0.05 * np.abs(own).max())
    # the 3-channel teacher on a gray student: exactly its view of the gray image repeated
    rgb_teacher = env["teacher"].for_channels(1)
    np.testing.assert_allclose(np.asarray(rgb_teacher.model.adapt(augment.normalize(gray))),
                               np.asarray(augment.normalize(np.repeat(gray, 3, -1))), atol=1e-6)
    # a distillation step of the 3-channel student on the 1-channel teacher's own head
    built = run.build_method(tiny_config(), "hinton_kd", 0, env["ds"], on_rgb, env["mesh"])
    assert built.setup.teacher_logits == "head" and hash(on_rgb.model)  # a static jit argument
    _, m = built.train_step(built.state, built.teacher, _batches(env, 1)[0])
    assert np.isfinite(float(m["loss"])) and float(m["loss_kd"]) > 0


def test_head_medium_tail_accuracy_matches_numpy_reference():
    counts = np.array([7, 300, 40, 2, 90, 15, 40])  # ranked: 1, 4, 2 | 6, 5, 0 | 3? (thirds)
    groups = metrics.class_groups(counts)
    # thirds of 7 classes by count, ties by index: [1, 4, 2] head, [6, 5] medium, [0, 3] tail
    np.testing.assert_array_equal(groups, [2, 0, 0, 2, 0, 1, 1])
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 400)
    pred = np.where(rng.random(400) < 0.3 + 0.1 * y / 7, y, rng.integers(0, 7, 400))
    got = metrics.group_accuracies(y, pred, groups)
    recall = np.array([np.mean(pred[y == c] == c) for c in range(7)])
    for g, name in enumerate(("head", "medium", "tail")):
        assert got[f"{name}_acc"] == pytest.approx(recall[groups == g].mean())
    # explicit boundaries (many, few): head > 50, tail < 10
    np.testing.assert_array_equal(metrics.class_groups(counts, (50, 10)), [2, 0, 1, 2, 0, 1, 1])


def test_radial_filters_split_the_image():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 10, 3)), jnp.float32)
    low, high = fourier.radial_filter(x, 0.3, "low"), fourier.radial_filter(x, 0.3, "high")
    np.testing.assert_allclose(np.asarray(low + high), np.asarray(x), atol=1e-5)
    assert float(jnp.abs(jnp.mean(high, (1, 2))).max()) < 1e-5  # DC removed by high-pass


def test_hyper_kvasir_csv_and_folder_tree(tmp_path):
    from jaxmed.data.datasets.hyper_kvasir import CLASSES

    root = tmp_path / "labeled-images"
    rows = []
    layout = {"polyps": ("lower-gi-tract", "pathological-findings", 6),
              "cecum": ("lower-gi-tract", "anatomical-landmarks", 3),
              "z-line": ("upper-gi-tract", "anatomical-landmarks", 1)}
    for finding, (organ, category, n) in layout.items():
        for i in range(n):
            uid = f"{finding[:2]}{i:02d}-aaaa"
            write_image(str(root / organ / category / finding / f"{uid}.jpg"), seed=i)
            rows.append([uid, "Lower GI" if organ.startswith("lower") else "Upper GI", finding,
                         category])
    with open(root / "image-labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Video file", "Organ", "Finding", "Classification"])
        w.writerows(rows)
    cfg = data_lib.default_config()
    cfg.name, cfg.root, cfg.val_fraction, cfg.test_fraction = "hyper_kvasir", str(tmp_path), .2, .2
    cfg.num_classes = 23  # 10 images: a class may fall in val / test only (stated, accepted)
    ds = data_lib.build(cfg)
    assert ds.info.num_classes == 23
    n = sum(len(ds[s]) for s in ("train", "val", "test"))
    assert n == 10
    labels = np.concatenate([ds[s].labels for s in ("train", "val", "test")])
    assert np.bincount(labels, minlength=23)[CLASSES.index("polyps")] == 6
    assert np.bincount(labels, minlength=23)[CLASSES.index("z-line")] == 1
    files = [f for s in ("train", "val", "test") for f in ds[s].files]
    for f, y in zip(files, labels):
        assert os.path.basename(os.path.dirname(f)) == CLASSES[y]
    # a label that disagrees with the image's folder fails naming the line
    rows[0][2] = "cecum"
    with open(root / "image-labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Video file", "Organ", "Finding", "Classification"], *rows])
    with pytest.raises(DataFormatError, match="line 2.*'cecum'.*'polyps'"):
        data_lib.build(cfg)
    os.remove(root / "image-labels.csv")  # without the CSV the folders are the labels
    ds = data_lib.build(cfg)
    assert sum(len(ds[s]) for s in ("train", "val", "test")) == 10


def test_isic2019_long_tailed_split_reads_finding(tmp_path):
    """Real split rows for the real ISIC 2019 ground-truth sample: the label is `finding`
    (0 NV, 1 MEL, ... by frequency), which must name the same class as the official one-hot."""
    from jaxmed.data.datasets.skin import FOPRO_CLASSES

    gt = {r["image"]: max(("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"), key=r.get)
          for r in csv.DictReader(open(os.path.join(SAMPLES, "ISIC_2019_Training_GroundTruth.csv")))}
    counts = np.zeros(8, int)
    picked = {}
    for split in ("train", "val", "test"):
        with open(os.path.join(SPLITS, f"{split}_skin1_0.002.csv")) as f:
            rows = list(csv.DictReader(f))
        if split == "train":
            counts = np.bincount([int(r["finding"]) for r in rows], minlength=8)
            mine = [r for r in rows if r["image"] in gt]
        else:  # images of other rows (no ground-truth sample there): distinct per split
            used = {r["image"] for p in picked.values() for r in p}
            mine = [r for r in rows if r["image"] not in used and r["image"] not in gt][:3]
        picked[split] = mine
    np.testing.assert_array_equal(counts, [12725, 4372, 2180, 897, 369, 152, 62, 25])
    assert len(picked["train"]) >= 5
    d = tmp_path / "splits"
    d.mkdir()
    for split, mine in picked.items():
        with open(d / f"{split}_skin1_0.002.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["image", "finding_name", "finding"])
            w.writeheader()
            w.writerows(mine)
        for i, r in enumerate(mine):
            write_image(str(tmp_path / "images" / f"{r['image']}.jpg"), seed=i)
    cfg = data_lib.default_config()
    cfg.name, cfg.root, cfg.split_file = "isic2019", str(tmp_path / "images"), str(
        d / "train_skin1_0.002.csv")
    cfg.num_classes = 8  # a few sample rows: some classes only in val / test (stated)
    ds = data_lib.build(cfg)
    assert ds.info.class_names == FOPRO_CLASSES
    for path, y in zip(ds["train"].files, ds["train"].labels):
        image = os.path.splitext(os.path.basename(path))[0]
        assert FOPRO_CLASSES[y] == gt[image], image
    assert [len(ds[s]) for s in ("val", "test")] == [3, 3]


def test_bad_config_names_the_key():
    c = tiny_config(methods=("ekd", "mixup"))
    with pytest.raises(ValueError, match="config.kd.methods: unknown"):
        fopro_kd.check_config(c)
    c = tiny_config(methods=("ekd",))
    c.kd.teacher_stage.epochs = 0
    with pytest.raises(ValueError, match="config.kd.teacher is empty"):
        fopro_kd.check_config(c)


def test_tiny_comparison_writes_the_report(env, monkeypatch):
    config = tiny_config(methods=("balanced_softmax", "ekd_fpg"))
    result = fopro_kd.train_and_evaluate(config, env["workdir"])
    report = os.path.join(env["workdir"], "report")
    rows = list(csv.DictReader(open(os.path.join(report, "comparison.csv"))))
    assert [r["method"] for r in rows] == ["balanced_softmax", "ekd_fpg"]
    cols = ["test/balanced_accuracy", "test/f1_macro", "test/accuracy", "test/head_acc",
            "test/medium_acc", "test/tail_acc"]
    assert set(rows[0]) == {"method", "seeds", *cols, *[c + "_std" for c in cols]}
    assert all(0.0 <= float(r[c]) <= 1.0 for r in rows for c in cols)
    assert result["ekd_fpg/test/tail_acc"] == pytest.approx(float(rows[1]["test/tail_acc"]),
                                                        abs=1e-5)
    for f in ("summary.md", "per_class_recall.png", "prompt_examples.png",
              "teacher_frequency.png", "teacher_frequency.csv"):
        assert os.path.getsize(os.path.join(report, f)) > 100, f
    # per-class recall keyed by class name; its mean over a group is that group's accuracy
    names, counts = env["ds"].info.class_names, env["ds"].info.class_counts
    run0 = comparison.read_result(comparison.run_dir(env["workdir"], "balanced_softmax", 0))
    recall = np.array([run0[f"test/recall/{n}"] for n in names])
    tail = metrics.class_groups(counts) == 2
    assert run0["test/tail_acc"] == pytest.approx(np.nanmean(recall[tail]))
    summary = open(os.path.join(report, "summary.md")).read()
    t_acc = comparison.read_result(env["teacher"].source)["test/accuracy"]
    assert f"test accuracy {t_acc:.3f}." in summary  # the teacher stage's own test accuracy
    assert "- ekd_fpg vs balanced_softmax on test/tail_acc:" in summary
    assert "1 / 1 seeds): too few seeds" in summary and "fewer than 3 seeds (1 vs 1)" in summary

    # adding a method to the finished comparison runs only its sub-run
    ran = []
    run_one = run.run_one
    monkeypatch.setattr(run, "run_one", lambda m, s, *a, **k: ran.append(m) or run_one(
        m, s, *a, **k))
    config = tiny_config(methods=("balanced_softmax", "ekd_fpg", "ekd"))
    result = fopro_kd.train_and_evaluate(config, env["workdir"])
    assert ran == ["ekd"]
    rows = list(csv.DictReader(open(os.path.join(report, "comparison.csv"))))
    assert [r["method"] for r in rows] == ["balanced_softmax", "ekd_fpg", "ekd"]
    assert result["ekd/test/tail_acc"] == pytest.approx(float(rows[2]["test/tail_acc"]), abs=1e-5)


def test_verdict_lines_say_why_not_with_the_figures():
    from types import SimpleNamespace

    from jaxmed.methods.fopro_kd import report

    def row(tail, std, seeds=3):
        return {"seeds": seeds, "test/tail_acc": tail, "test/tail_acc_std": std}

    summary = {"balanced_softmax": row(0.30, 0.05), "ekd": row(0.50, 0.10),
               "ekd_fpg": row(0.38, 0.10), "hinton_kd": row(0.20, 0.01),
               "feature_kd": row(0.60, 0.01, seeds=2)}
    # tail = the third of the classes with the fewest training images: c1 (5) and c5 (2)
    info = SimpleNamespace(class_counts=np.array([50, 5, 20, 9, 30, 2]),
                           class_names=[f"c{i}" for i in range(6)])
    lines = report.verdict_lines(summary, tiny_config(), info, 0.912)
    why = "; teacher test acc 0.912; tail training counts: c1 5, c5 2"
    # 2 SE of the difference: 2 sqrt(sd_a^2 / 3 + sd_b^2 / 3)
    assert lines == [
        "- ekd vs balanced_softmax on test/tail_acc: 0.500 ± 0.100 vs 0.300 ± 0.050 (gap "
        "+0.200, 2 SE 0.129, 3 / 3 seeds): better",
        "- ekd_fpg vs balanced_softmax on test/tail_acc: 0.380 ± 0.100 vs 0.300 ± 0.050 (gap "
        "+0.080, 2 SE 0.129, 3 / 3 seeds): within noise",
        "  - why not: gap +0.080 within 2 standard errors of the difference; tail acc ekd_fpg "
        "0.380 ± 0.100, balanced_softmax 0.300 ± 0.050 over 3 / 3 seeds" + why,
        "- hinton_kd vs balanced_softmax on test/tail_acc: 0.200 ± 0.010 vs 0.300 ± 0.050 (gap "
        "-0.100, 2 SE 0.059, 3 / 3 seeds): worse",
        "  - why not: tail accuracy lower (0.200 vs 0.300) beyond 2 standard errors; tail acc "
        "hinton_kd 0.200 ± 0.010, balanced_softmax 0.300 ± 0.050 over 3 / 3 seeds" + why,
        "- feature_kd vs balanced_softmax on test/tail_acc: 0.600 ± 0.010 vs 0.300 ± 0.050 (gap "
        "+0.300, 2 SE 0.059, 2 / 3 seeds): too few seeds",
        "  - why not: fewer than 3 seeds (2 vs 3); tail acc feature_kd 0.600 ± 0.010, "
        "balanced_softmax 0.300 ± 0.050 over 2 / 3 seeds" + why]


def test_verdict_lines_cover_every_kd_method_balanced_kd_included():
    from types import SimpleNamespace

    from jaxmed.methods.fopro_kd import report

    def row(tail, std):
        return {"seeds": 3, "test/tail_acc": tail, "test/tail_acc_std": std}

    assert set(report.KD_METHODS) == set(step.METHODS) - set(step.STUDENT_ONLY)
    summary = {"balanced_softmax": row(0.30, 0.05), "balanced_kd": row(0.34, 0.02),
               "hinton_kd": row(0.10, 0.02)}
    info = SimpleNamespace(class_counts=np.array([50, 5, 20]), class_names=["a", "b", "c"])
    lines = report.verdict_lines(summary, tiny_config(), info, None)
    assert lines[2] == ("- balanced_kd vs balanced_softmax on test/tail_acc: 0.340 ± 0.020 vs "
                        "0.300 ± 0.050 (gap +0.040, 2 SE 0.062, 3 / 3 seeds): within noise")
    assert lines[3].startswith("  - why not: gap +0.040 within 2 standard errors")


def test_a_tail_gain_that_costs_balanced_accuracy_is_flagged():
    from types import SimpleNamespace

    from jaxmed.methods.fopro_kd import report

    def row(tail, bal):
        return {"seeds": 3, "test/tail_acc": tail, "test/tail_acc_std": 0.01,
                "test/balanced_accuracy": bal, "test/balanced_accuracy_std": 0.01}

    summary = {"balanced_softmax": row(0.30, 0.35), "ekd": row(0.45, 0.36),
               "balanced_kd": row(0.79, 0.25)}  # both better on the tail; one degenerate
    info = SimpleNamespace(class_counts=np.array([50, 5, 20]), class_names=["a", "b", "c"])
    lines = report.verdict_lines(summary, tiny_config(), info, None)
    assert lines[0].endswith(": better") and lines[1].endswith(": better")
    assert lines[2].startswith("  - caution: the tail gain costs the other classes: "
                               "balanced_kd vs balanced_softmax on test/balanced_accuracy")
    assert lines[2].endswith(": worse") and len(lines) == 3


@pytest.mark.parametrize("key,bad,msg", [
    ("cb_reduction", "sum", r"config.kd.cb_reduction='sum': one of \('weighted', 'mean'\)"),
    ("cb_reduction", "", "config.kd.cb_reduction=''"),
    ("w_kd_ramp", 1.0, r"config.kd.w_kd_ramp=1.0: 0 \(off\) or .*\(0, 1\)"),
    ("w_kd_ramp", -0.2, "config.kd.w_kd_ramp=-0.2"),
])
def test_check_config_refuses_cb_reduction_and_w_kd_ramp_naming_the_key(key, bad, msg):
    from jaxmed import main
    from jaxmed.config_check import ConfigKeyError

    c = tiny_config(**{key: bad})
    with pytest.raises(ValueError, match=msg):
        fopro_kd.check_config(c)
    with pytest.raises(ConfigKeyError, match=msg):  # main's "config error", before any work
        main.validate(c)
    fopro_kd.check_config(tiny_config(cb_reduction="mean", w_kd_ramp=0.3))


def test_setup_from_config_takes_the_kd_keys_by_name():
    kd = tiny_config(w_kd=1.5, temperature=2.0, ldam_scale=7.0, cb_beta=0.99, la_tau=0.3,
                     drw_start=0.5, kd_class_weights=True).kd
    setup = step.Setup.from_config(kd, method="ekd", model=None, heads=None, tx=None,
                                   class_counts=np.array([3, 1]), drw_start=40,
                                   kd_class_weights=np.array([0.5, 1.5]))
    assert (setup.w_kd, setup.temperature, setup.ldam_scale, setup.cb_beta, setup.la_tau) == (
        1.5, 2.0, 7.0, 0.99, 0.3)
    assert setup.drw_start == 40 and list(setup.kd_class_weights) == [0.5, 1.5]
    assert setup.teacher_net is None  # not config.kd.teacher_model (an architecture name)
    with pytest.raises(TypeError, match="drw_start"):
        step.Setup.from_config(kd, method="ekd", model=None, heads=None, tx=None,
                               class_counts=np.array([3, 1]), kd_class_weights=None)


def test_student_losses_take_the_setups_hyperparameters():
    """Each student-only method's supervised term is its loss with the setup's beta / tau /
    gamma (not the loss defaults), on asymmetric class counts."""
    import dataclasses

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 0, 2])
    counts = np.array([50, 20, 5, 2])
    kw = {f.name: None for f in dataclasses.fields(step.Setup)}
    kw.update(class_counts=tuple(counts), cb_beta=0.99, la_tau=0.5, focal_gamma=1.5)
    want = {"ce": losses.cross_entropy(logits, labels),
            "focal": losses.focal(logits, labels, 1.5),
            "class_balanced": losses.class_balanced(logits, labels, counts, 0.99),
            "logit_adjusted": losses.logit_adjusted(logits, labels, counts, 0.5),
            "balanced_softmax": losses.balanced_softmax(logits, labels, counts)}
    for method, ref in want.items():
        setup = step.Setup(**{**kw, "method": method})
        _, parts = step.per_sample_loss(setup, {"logits": logits}, labels, 0)
        np.testing.assert_allclose(parts["loss_sup"], ref, rtol=1e-6, err_msg=method)


def test_probe_stage_stops_on_nan_and_writes_atomically(env, tmp_path, monkeypatch):
    """Issue 24: a huge kd.fpg.lr saved an all-NaN prompt that every resume reused. Now the
    stage stops naming itself, the step and the file, and saves nothing; and a kill during the
    write leaves no stage file (tmp + os.replace)."""
    config = tiny_config()
    config.kd.fpg.lr = 1e38  # the probe overflows at step 1, its loss is NaN at step 2
    built = run.build_method(config, "ekd_fpg", 0, env["ds"], env["teacher"], env["mesh"])
    d = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"Fourier-prompt stage \(prompt \+ probe\).*"
                       r"non-finite .* at step [12] of 2.*nothing saved.*fpg_stage.npz"):
        run.fit_probe_stage(config, built, env["ds"], 0, env["mesh"], True, d)
    assert not os.path.exists(os.path.join(d, "fpg_stage.npz"))

    config = tiny_config()
    built = run.build_method(config, "hinton_kd", 0, env["ds"], env["teacher"], env["mesh"])
    d = str(tmp_path / "killed")

    def killed_mid_write(file, **arrays):
        file.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run.fit_probe_stage(config, built, env["ds"], 0, env["mesh"], False, d)
    assert os.listdir(d) == []  # neither a half stage file nor a leftover temporary one


def test_files_read_back_from_a_workdir_are_checked(env, tmp_path, monkeypatch):
    """Every file FoPro-KD reads back (the stage file, prompt.npz, the teacher workdir's
    config.json and checkpoint) is checked: an error names the file and what to delete (not a
    bare zipfile.BadZipFile / orbax traceback)."""
    import shutil

    from jaxmed.methods.fopro_kd import report

    config = tiny_config()
    built = run.build_method(config, "ekd_fpg", 0, env["ds"], env["teacher"], env["mesh"])
    d = tmp_path / "run"
    d.mkdir()
    stage = d / "fpg_stage.npz"

    def probe():
        run.fit_probe_stage(config, built, env["ds"], 0, env["mesh"], True, str(d))

    stage.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=rf"{stage} is unreadable .*delete it to redo the "
                       "Fourier-prompt stage"):
        probe()
    good = {"kernel": np.zeros((16, 4), np.float32), "bias": np.zeros(4, np.float32),
            "log_mask": np.zeros((16, 9, 3), np.float32)}
    np.savez(stage, **{**good, "log_mask": np.full((16, 9, 3), np.nan, np.float32)})
    with pytest.raises(ValueError, match=rf"{stage} holds non-finite values \(log_mask\).*delete"):
        probe()
    np.savez(stage, **{**good, "kernel": np.zeros((8, 4), np.float32)})
    with pytest.raises(ValueError, match=rf"{stage}: kernel has shape \(8, 4\), not \(16, 4\).*"
                       "delete"):
        probe()
    np.savez(stage, **good)
    probe()  # a good one is read back

    wd = tmp_path / "cmp"
    prompt = wd / "runs" / "ekd_fpg" / "seed_0" / "prompt.npz"
    prompt.parent.mkdir(parents=True)
    prompt.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=rf"{prompt} is unreadable .*delete it and "
                       rf"{prompt.parent}/result.json"):
        report.prompt_figure(str(tmp_path / "p.png"), str(wd), ["ekd_fpg"], config, env["ds"])

    t = tmp_path / "teacher"
    shutil.copytree(env["teacher"].source, t)
    (t / "result.json").write_text('{"test/accuracy": 0.9')
    with pytest.raises(ValueError, match=rf"{t}/result.json is unreadable .*delete it"):
        seen = _stub_comparison(monkeypatch)  # found before any run starts
        fopro_kd.train_and_evaluate(tiny_config(teacher=str(t), methods=("ekd",)),
                                    str(tmp_path / "cmp2"))
    assert not seen
    ck = t / "checkpoints"
    for f in ck.rglob("*"):
        if f.is_file() and "state" in f.parts and f.stat().st_size > 200:
            f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"teacher workdir {t}: its checkpoint {ck}/\d+ is "
                       "unreadable.*delete"):
        teachers.from_workdir(str(t))
    (t / "config.json").write_text('{"model": ')
    c = tiny_config(teacher=str(t), methods=("ekd",))
    with pytest.raises(ValueError, match=rf"{t}/config.json is unreadable"):
        fopro_kd.check_config(c)


def test_teacher_path_errors_are_one_line_config_errors(tmp_path):
    """A teacher path that is missing, a folder that is not a jaxmed workdir, a workdir without
    a checkpoint: one line from check_config (main turns it into 'config error', exit 2)."""
    from jaxmed import main
    from jaxmed.config_check import ConfigKeyError

    cases = [(str(tmp_path / "nope"), "does not exist"),
             (str(tmp_path), "not a jaxmed workdir: no config.json")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model": {"name": "resnet8"}}')
    cases.append((str(tmp_path / "run"), "holds no checkpoint"))
    for path, msg in cases:
        c = tiny_config(teacher=path, methods=("ekd",), teacher_model="resnet18")
        with pytest.raises(ConfigKeyError, match=rf"config.kd.teacher={path!r}.*{msg}") as e:
            main.validate(c)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="config.kd.teacher_classes"):
        fopro_kd.check_config(tiny_config(teacher_classes=("a", "a")))


def _stub_comparison(monkeypatch):
    """train_and_evaluate with each sub-run a stub (no training, no report): `seen['teacher']`
    is the teacher it hands the runs."""
    seen = {}

    def run_one(method, seed, run_workdir, sub, *, teacher_model, **kw):
        seen["teacher"] = teacher_model
        return {"test/tail_acc": 0.5}

    monkeypatch.setattr(run, "run_one", run_one)
    monkeypatch.setattr(fopro_kd.report, "write_report", lambda *a, **k: {})
    return seen


def test_teacher_class_names_and_identity_are_checked(env, gray_teacher, torch_r18, tmp_path,
                                                      monkeypatch):
    """Issue 22: a teacher whose head has the data's class count but other or swapped classes
    is refused naming them (a PyTorch teacher states them in config.kd.teacher_classes; a
    jaxmed workdir's come from its data). Issue 24: the teacher's identity is recorded in the
    comparison (teacher.json) and a teacher replaced between a kill and the resume refused."""
    import dataclasses
    import shutil

    import torch

    from tests.torch_reference import BasicBlock, ResNet

    seen = _stub_comparison(monkeypatch)
    _, path = torch_r18
    pth = str(tmp_path / "teacher.pth")
    shutil.copy(path, pth)
    names = ("class_0", "class_1", "class_2", "class_3")
    swapped = ("class_1", "class_0", "class_2", "class_3")

    def start(name, **kd):
        c = tiny_config(methods=("hinton_kd",), **kd)
        return fopro_kd.train_and_evaluate(c, str(tmp_path / name))

    torch_kd = {"teacher": pth, "teacher_model": "resnet18"}
    with pytest.raises(ValueError, match=r"classes \('class_1', 'class_0', 'class_2', "
                       r"'class_3'\) are the data's in another order \('class_0', 'class_1', "
                       r"'class_2', 'class_3'\)"):
        start("b", **torch_kd, teacher_classes=swapped)
    start("d", **torch_kd, teacher_classes=names)
    t = seen["teacher"]
    assert t.num_classes == 4 and t.class_names == names
    with pytest.raises(ValueError, match=r"4-class head like the data.*set "
                       r"config.kd.teacher_classes"):
        teachers.check_classes(dataclasses.replace(t, class_names=None), names)
    with pytest.raises(ValueError, match=r"'class_x'\) are not the data's .*not in the "
                       r"teacher: \['class_3'\], not in the data: \['class_x'\]"):
        teachers.check_classes(dataclasses.replace(t, class_names=names[:3] + ("class_x",)),
                               names)
    teachers.check_classes(dataclasses.replace(t, class_names=swapped), names[:3])  # no head
    record = json_load(tmp_path / "d" / "teacher.json")
    assert record["sha256"] and record["source"] == pth
    start("d", **torch_kd, teacher_classes=names)  # the same teacher resumes
    torch.save({"state_dict": ResNet(BasicBlock, [2, 2, 2, 2], 4).state_dict()}, pth)
    with pytest.raises(ValueError, match=rf"{pth} is not the teacher this comparison was "
                       rf"started with \(.*{tmp_path / 'd' / 'teacher.json'}"):
        start("d", **torch_kd, teacher_classes=names)

    # a jaxmed workdir: names from its data; stated ones must agree; replaced -> refused
    wd_teacher = tmp_path / "t"
    shutil.copytree(env["teacher"].source, wd_teacher)
    with pytest.raises(ValueError, match=r"config.kd.teacher_classes=\('class_1', 'class_0'.*"
                       r"its data's \('class_0', 'class_1'"):
        teachers.from_workdir(str(wd_teacher), class_names=swapped)
    start("f", teacher=str(wd_teacher))
    assert seen["teacher"].class_names == names
    shutil.rmtree(wd_teacher)
    shutil.copytree(gray_teacher, wd_teacher)
    with pytest.raises(ValueError, match=rf"{wd_teacher} is not the teacher this comparison was "
                       "started with"):
        start("f", teacher=str(wd_teacher))


def json_load(path):
    import json
    with open(path) as f:
        return json.load(f)


def test_half_done_sub_run_never_resumes_under_a_new_w_kd(env, tmp_path, monkeypatch):
    """Issue 24: a half-done FoPro-KD sub-run resumed under a new kd.w_kd. The engine's
    per-sub-run config.json covers it: even with the change accepted at the top
    (--allow_config_change) the old sub-run is not resumed (refused, or set aside and run
    afresh under the new value)."""
    from jaxmed.train import workdir as workdir_lib

    monkeypatch.setattr(fopro_kd.report, "write_report", lambda *a, **k: {})
    wd = str(tmp_path / "cmp")
    calls = []

    def killed(method, seed, run_workdir, sub, **kw):
        os.makedirs(os.path.join(run_workdir, "checkpoints", "3"))
        raise RuntimeError("killed")

    monkeypatch.setattr(run, "run_one", killed)
    config = tiny_config(teacher=env["teacher"].source, methods=("ekd",))
    with pytest.raises(RuntimeError, match="killed"):
        fopro_kd.train_and_evaluate(config, wd)

    def fresh(method, seed, run_workdir, sub, **kw):
        calls.append((os.listdir(run_workdir), sub.kd.w_kd,
                      json_load(os.path.join(run_workdir, "config.json"))["kd"]["w_kd"]))
        return {"test/tail_acc": 0.5}

    monkeypatch.setattr(run, "run_one", fresh)
    config = tiny_config(teacher=env["teacher"].source, methods=("ekd",), w_kd=1.0)
    with pytest.raises(workdir_lib.ConfigChangedError, match="kd.w_kd"):
        fopro_kd.train_and_evaluate(config, wd)
    workdir_lib.write_config(config, wd, allow_changed=True, harmless=fopro_kd.HARMLESS_KEYS)
    try:
        fopro_kd.train_and_evaluate(config, wd)
    except workdir_lib.ConfigChangedError as e:  # refused: also never resumed
        assert "kd.w_kd" in str(e) and not calls
        return
    assert calls == [(["config.json"], 1.0, 1.0)]  # a fresh sub-run under the new value
