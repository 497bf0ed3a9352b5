"""BiasPruner's bias-score variants against a numpy reference where they disagree, per-layer
normalisation moving the cut to another layer, the unit analysis recovering planted shortcut
units, and the patch sequence (the default sequence bitwise unchanged)."""

import copy
import hashlib
import importlib.util
import os

import jax
import numpy as np
import pytest

from jaxmed.data import synthetic_bias as sb
from jaxmed.methods import biaspruner
from jaxmed.methods.biaspruner import frame, scores, subnetworks, units
from jaxmed.methods.biaspruner.tasks import build_tasks
from jaxmed.pruning import structured
from tests.conftest import REPO

L1, L2, L3 = "layer1_0/conv1", "layer2_0/conv1", "layer3_0/conv1"


def _config(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(
        f"bp_score_{name}", os.path.join(REPO, "configs", "biaspruner", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ------------------------------------------------------------------- the numpy reference
def _reference(acts, aligned, labels, kind):
    """The four scores written out sample by sample (scores' module docstring)."""
    def diff(a, rows):
        s_ba = [a[n] for n in rows if aligned[n]]
        s_bc = [a[n] for n in rows if not aligned[n]]
        return ((sum(s_ba) / len(s_ba) if s_ba else 0.0)
                - (sum(s_bc) / len(s_bc) if s_bc else 0.0))

    out = {}
    for name, act in acts.items():
        n, c = act.shape
        d = np.array([diff(act[:, j], range(n)) for j in range(c)])
        if kind == "paper":
            out[name] = d
        elif kind == "absolute":
            out[name] = np.abs(d)
        elif kind == "layer_normalised":
            mean = sum(d) / c
            sd = np.sqrt(sum((x - mean) ** 2 for x in d) / c)
            out[name] = (d - mean) / sd
        else:  # class_conditional: classes with both groups, each counted once
            per = []
            for k in sorted(set(labels.tolist())):
                rows = [i for i in range(n) if labels[i] == k]
                if any(aligned[i] for i in rows) and not all(aligned[i] for i in rows):
                    per.append([abs(diff(act[:, j], rows)) for j in range(c)])
            out[name] = np.array([sum(p[j] for p in per) / len(per) for j in range(c)])
    return out


def _two_by_two(rng):
    """Cells (label, attribute): (0, red) 30 aligned, (0, green) 20 conflicting, (1, green) 30
    aligned, (1, red) 10 conflicting. Layer 1: u0 a red detector, 2.0 on red class-0 and 3.0
    on red class-1 images (paper: 60/60 - 30/30 = 0; class-conditional (|2 - 0| + |0 - 3|) / 2
    = 2.5; a signed per-class mean would give -0.5, a size-weighted one 2.44), u1 an aligned
    detector, u2 a conflicting detector, u3 a class-1 detector (paper 0.25, class-conditional
    ~0); layer 2: noise at another scale."""
    cells = [(0, 0, 30), (0, 1, 20), (1, 1, 30), (1, 0, 10)]
    labels = np.concatenate([np.full(n, y) for y, _, n in cells])
    attr = np.concatenate([np.full(n, a) for _, a, n in cells])
    aligned = attr == labels
    n = len(labels)
    noise = rng.uniform(0, 0.1, (n, 4))
    l1 = np.stack([np.where(attr == 0, np.where(labels == 0, 2.0, 3.0), 0.0),
                   1.0 * aligned + noise[:, 1], 0.8 * ~aligned + noise[:, 2],
                   1.5 * (labels == 1) + noise[:, 3]], axis=1)
    l2 = rng.uniform(0, 5, (n, 3))
    return {L1: l1, L2: l2}, aligned, labels, attr


@pytest.mark.parametrize("kind", scores.BIAS_SCORES)
def test_score_variants_equal_the_numpy_reference_where_they_disagree(kind):
    acts, aligned, labels, _ = _two_by_two(np.random.default_rng(0))
    got = scores.bias_scores(acts, aligned, labels, kind)
    want = _reference(acts, aligned, labels, kind)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)
    red = got[L1][0]
    if kind == "paper":  # the red detector cancels; the class detector looks biased
        assert red == pytest.approx(0.0, abs=1e-12) and got[L1][3] > 0.2
        assert int(np.argmax(got[L1])) == 1  # the aligned detector ranks first
    if kind == "absolute":
        assert red == pytest.approx(0.0, abs=1e-12) and got[L1][2] > 0.7
    if kind == "class_conditional":  # the red detector ranks first; the class detector ~0
        assert red == pytest.approx(2.5) and int(np.argmax(got[L1])) == 0
        assert got[L1][3] < 0.1


def test_layer_normalisation_changes_which_layer_is_pruned():
    """Layer A's differences (10, 11, 12, 13) dwarf layer B's (0, 0, 0, 0.1): the raw global
    cut of one unit takes A's largest, the z-scored one B's outlier (z 1.73 > 1.34)."""
    rng = np.random.default_rng(1)
    aligned = np.arange(40) % 4 != 0
    acts = {}
    for name, d in (("layer1_0/conv1", [10.0, 11.0, 12.0, 13.0]),
                    ("layer2_0/conv1", [0.0, 0.0, 0.0, 0.1])):
        acts[name] = rng.uniform(0, 1, 4) + np.outer(aligned, d)  # base + d on aligned
    removed = {}
    for kind in ("paper", "layer_normalised"):
        s = scores.bias_scores(acts, aligned, None, kind)
        kept = subnetworks.keep_units("bias", 1 / 8, s, None)
        removed[kind] = {k: np.flatnonzero(~m).tolist() for k, m in kept.items() if (~m).any()}
    assert removed["paper"] == {"layer1_0/conv1": [3]}
    assert removed["layer_normalised"] == {"layer2_0/conv1": [3]}
    np.testing.assert_allclose(scores.bias_scores(acts, aligned, None, "paper")["layer2_0/conv1"],
                               [0, 0, 0, 0.1], atol=1e-12)


def test_class_conditional_without_both_groups_in_any_class_scores_zero(caplog):
    acts = {L1: np.arange(8.0).reshape(4, 2)}
    labels = np.array([0, 0, 1, 1])
    aligned = np.array([True, True, False, False])  # each class holds one group only
    with caplog.at_level("WARNING"):
        s = scores.bias_scores(acts, aligned, labels, "class_conditional")
    np.testing.assert_array_equal(s[L1], [0.0, 0.0])
    assert "no class has both" in caplog.text


def test_unknown_bias_score_is_refused_naming_the_key():
    c = biaspruner.default_config()
    assert c.continual.bias_score == "paper"
    c.continual.bias_score = "class-conditional"
    with pytest.raises(ValueError, match=r"config.continual.bias_score='class-conditional'"
                                         r": use one of \('paper'"):
        biaspruner.check_config(c)
    with pytest.raises(ValueError, match="unknown variant 'papr'"):
        _config("patch", "papr")


@pytest.fixture(scope="module")
def seq():
    cfg = _config("quick", "tiny")
    tasks, info = build_tasks(cfg)
    return frame.TaskSequence(cfg, tasks, info)


def test_score_pass_ranks_by_the_configured_variant(seq):
    """`continual.bias_score` reaches the jitted scoring pass: its scores equal the numpy
    reference over the pass's activations, the GCE model's split and the records' own labels
    (fetched by index), on task 1 (global classes 2, 3)."""
    cfg = copy.deepcopy(seq.config)
    cfg.continual.bias_score = "class_conditional"
    s1 = seq.with_config(cfg)
    setup, state = subnetworks.init(s1, "bias")
    assert setup.bias_score == "class_conditional"
    rng = np.random.default_rng(0)
    backbone = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(v.dtype),
                            state.backbone)
    stats = jax.tree.map(lambda x: x[1], state.task_stats)
    source = seq.tasks[1].splits["train"]
    # a head that splits the images in half along a random feature direction, whatever their
    # label: both classes then hold right (aligned) and wrong (conflicting) predictions
    features = jax.jit(lambda x: frame.features(setup.model, backbone, stats, x,
                                                train=False)[0])
    feats = np.concatenate([np.asarray(features(b["image"])) for b in s1.batches(source)])
    w = rng.normal(size=feats.shape[1])
    heads = jax.tree.map(np.array, state.heads)
    heads["kernel"][1] = 0.0
    heads["kernel"][1, :, 0] = w
    heads["bias"][1] = [-np.median(feats @ w), 0.0]
    params = {"backbone": backbone, "heads": heads}
    scored = subnetworks.score_pass(s1, setup, params, stats, 1, seq.cmask, source)
    out = subnetworks.unit_pass(s1, setup, params, stats, 1, seq.cmask, source)
    by_index = {int(r["index"]): int(r["label"]) for r in (source[i] for i in range(len(source)))}
    labels = np.array([by_index[int(i)] for i in out["index"]])
    aligned = scored["correct"]
    assert all(aligned[labels == k].any() and not aligned[labels == k].all() for k in (0, 1))
    acts = {k[4:]: v for k, v in out.items() if k.startswith("act/")}
    want = _reference({k: np.asarray(v, np.float64) for k, v in acts.items()}, aligned, labels,
                      "class_conditional")
    for k in want:
        np.testing.assert_allclose(scored["scores"][k], want[k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------- the unit analysis
def _unit_model(labels, attr, rng):
    """Pooled activations of 3 layers x 6 units: shortcut units L1 u1 (red), L1 u4 (green) and
    L3 u0 (red class-0 and green class-1 images: pooled over classes its AUC is 0.5); L2 u2
    reads the class (the outline), L2 u5 the colour weakly; the rest is noise."""
    n = len(labels)
    red, y = (attr == 0).astype(float), labels.astype(float)
    acts = {k: rng.uniform(0, 0.5, (n, 6)) for k in (L1, L2, L3)}
    acts[L1][:, 1] += 2.0 * red
    acts[L1][:, 4] += 2.0 * (1 - red)
    acts[L2][:, 2] += 2.0 * y
    acts[L2][:, 5] += 0.1 * red
    acts[L3][:, 0] += 2.0 * (attr == labels)
    return acts


PLANTED = {L1: [1, 4], L2: [], L3: [0]}


def test_unit_analysis_recovers_planted_shortcut_units():
    from sklearn.metrics import roc_auc_score

    from jaxmed import metrics
    rng = np.random.default_rng(0)
    # held-out images: attribute independent of the class (unbiased)
    labels, attr = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    test = _unit_model(labels, attr, rng)
    sep = units.separation(test, attr, labels)
    for k, c in ((L1, 1), (L2, 5), (L3, 0), (L2, 2)):  # sklearn oracle, per class
        per = [roc_auc_score(attr[labels == j], test[k][labels == j, c]) for j in (0, 1)]
        assert sep[k][c] == pytest.approx(np.mean([max(a, 1 - a) for a in per]), rel=1e-9)
    assert abs(metrics.binary_auc(test[L3][:, 0], attr) - 0.5) < 0.1  # pooled: invisible
    short = units.shortcut_units(sep)
    assert {k: np.flatnonzero(v).tolist() for k, v in short.items()} == PLANTED

    # training images of a biased task, split as a GCE model reading the colour would
    cells = [(0, 0, 45), (0, 1, 5), (1, 1, 45), (1, 0, 5)]
    tl = np.concatenate([np.full(n, y) for y, _, n in cells])
    ta = np.concatenate([np.full(n, a) for _, a, n in cells])
    train = _unit_model(tl, ta, rng)
    ranks = units.rankings(train, ta == tl, tl, seed=0)
    layer3_first = {L1: np.zeros(6), L2: np.ones(6), L3: 2 + np.arange(6.0)}
    ranks["layer3_first"] = (layer3_first, "highest")
    gamma = 3 / 18
    report = units.analyse(ranks, short, gamma, sep=sep)
    assert report["units"] == 18 and report["shortcut_units"] == 3
    assert report["chance"] == pytest.approx(3 / 18)
    for name, (values, prune) in ranks.items():  # every figure against the masks in numpy
        kept = structured.channel_masks(values, gamma, prune=prune)
        r = report["rankings"][name]
        pruned = {k: np.flatnonzero(~kept[k]) for k in kept}
        hits = sum(len(set(pruned[k]) & set(PLANTED[k])) for k in kept)
        total = sum(len(p) for p in pruned.values())
        assert (r["pruned"], r["shortcut_pruned"]) == (total, hits), name
        assert r["precision"] == pytest.approx(hits / total)
        assert r["recall"] == pytest.approx(hits / 3)
        for k in kept:
            assert r["per_layer"][k]["pruned"] == len(pruned[k])
            assert r["per_layer"][k]["shortcut_pruned"] == len(set(pruned[k]) & set(PLANTED[k]))
    cc, paper = report["rankings"]["class_conditional"], report["rankings"]["paper"]
    assert cc["precision"] == 1.0 and cc["recall"] == 1.0
    # the paper's score cancels for the two colour detectors: only L3 u0 is pruned
    assert paper["shortcut_pruned"] == 1 and paper["per_layer"][L3]["shortcut_pruned"] == 1
    assert cc["per_layer"][L1]["shortcut_position"] <= 2 / 17  # among the first three
    assert paper["per_layer"][L1]["shortcut_position"] > 0.3
    # a cut whose raw ranking takes a whole layer: kept at one unit, and flagged
    l3 = units.analyse({"l3": (layer3_first, "highest")}, short, 6 / 18)["rankings"]["l3"]
    assert l3["emptied_by_raw_cut"] == [L3]
    assert l3["per_layer"][L3]["raw_pruned"] == 6 and l3["per_layer"][L3]["pruned"] == 5
    assert report["scores"]["paper"][L1]["max"] == pytest.approx(ranks["paper"][0][L1].max())
    assert "random" not in report["scores"]
    rows = units.table_rows(report)
    assert len(rows) == len(ranks) * 4


# ------------------------------------------------------------------------ the sequences
def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_default_sequence_is_bitwise_unchanged():
    """Digests recorded before `patch_size` existed: the option off changes no image."""
    assert _sha(*sb.generate(2, 24, 16, 0.9, shape_noise=0.1, noise=20.0, shared_colours=True,
                             seed=[5, 1])) == (
        "cf0893cc5663743ecf08fc615948aa5de98bee9420dff8082cd80fbc0c9f6ace")
    assert _sha(*sb.generate(2, 24, 16, 0.9, seed=3)) == (
        "960431cbf71e17a780dc920dbda687281ddfd16893b81344664ce58804ebe981")
    data = sb.build(_config("quick", "tiny").data)
    s = data.splits["test"]
    assert _sha(s.images, s.labels, s.attrs["bias"], s.attrs["aligned"]) == (
        "392d1b3a73af2d6c17d3e534403a759fa1c363ea43ded595e72f00f3b513a27b")


def test_patch_moves_the_colour_from_the_glyph_into_a_corner_square():
    kw = dict(num_tasks=2, per_task=60, size=16, bias_rate=0.8, noise=0.0, shared_colours=True,
              seed=4)
    plain, y, bias, aligned = sb.generate(**kw)
    patched, y2, bias2, aligned2 = sb.generate(**kw, patch_size=3)
    assert (y == y2).all() and (bias == bias2).all() and (aligned == aligned2).all()
    m = sb.PATCH_MARGIN
    corner = np.zeros((16, 16), bool)
    corner[m:m + 3, m:m + 3] = True
    glyph_means = {0: [], 1: []}
    for i in range(len(y)):
        patch = patched[i][corner].astype(float)
        assert np.ptp(patch, axis=0).max() == 0  # one colour (no pixel noise here)
        dist = np.linalg.norm(sb.COLOURS[0] - patch[0], axis=-1)  # to red, green
        assert np.argmin(dist) == bias[i] and dist.min() < 45, i
        changed = np.any(plain[i] != patched[i], axis=-1) & ~corner  # the glyph, recoloured
        assert changed.sum() > 5
        glyph_means[int(bias[i])].append(patched[i][changed].mean(0))
        np.testing.assert_array_equal(plain[i][~changed & ~corner], patched[i][~changed & ~corner])
    g0, g1 = (np.mean(glyph_means[b], axis=0) for b in (0, 1))
    assert np.abs(g0 - g1).max() < 10  # the glyph no longer tells the colours apart
    assert np.abs(g0 - sb.GLYPH_NEUTRAL).max() < 10
    with pytest.raises(ValueError, match="patch_size=7 must be an integer in 0..6"):
        sb.generate(**{**kw, "patch_size": 7})


def test_patch_config_builds_its_sequence():
    """configs/biaspruner/patch.py: benchmark.py's sequence with the patch on; `:tiny` builds
    its data (tests), a score name runs only BiasPruner under that score."""
    full, base = _config("patch"), _config("benchmark")
    assert full.data.synthetic_bias.patch_size == 4 and base.data.synthetic_bias.patch_size == 0
    other = copy.deepcopy(full)
    other.data.synthetic_bias.patch_size = 0
    assert other.to_dict() == base.to_dict()
    tiny = _config("patch", "tiny")
    biaspruner.check_config(tiny)
    test = sb.build(tiny.data).splits["test"]
    m, p = sb.PATCH_MARGIN, tiny.data.synthetic_bias.patch_size
    red = test.images[:, m:m + p, m:m + p].astype(float).mean((1, 2))  # [N, 3]
    is_red = red[:, 0] > red[:, 1]
    np.testing.assert_array_equal(is_red, test.attrs["bias"] == 0)
    variant = _config("patch", "layer_normalised")
    assert variant.continual.bias_score == "layer_normalised"
    assert variant.continual.methods == ("biaspruner",)
    assert _config("benchmark", "absolute").continual.bias_score == "absolute"
