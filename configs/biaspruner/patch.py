r"""BiasPruner against every continual baseline on the patch sequence, five seeds: the
sequence of benchmark.py with the spurious colour moved from the glyph into a small patch.

    jaxmed --config=configs/biaspruner/patch.py --workdir=workdirs/biaspruner_patch

Each variant of the bias score against the magnitude ablation (only BiasPruner runs; the
ablation to compare with is the run above's biaspruner_magnitude, which no score changes):

    jaxmed --config=configs/biaspruner/patch.py:class_conditional \
        --workdir=workdirs/biaspruner_patch_class_conditional

and likewise `:layer_normalised`, `:absolute` (`:paper` is the first run's biaspruner). Where
each ranking puts the shortcut units of task 0's GCE model:

    python benchmarks/biaspruner_units.py --config=configs/biaspruner/patch.py \
        --out=bench_out/biaspruner_units_patch.json

Data: benchmark.py's (jaxmed.data.synthetic_bias: two binary tasks, plus / cross then square /
diamond, 3,000 training images per task with the attribute matching the label in 97%, 600
unbiased test images, outline label noise 10%, pixel noise 20, 24 px, flips and 2-px shifts)
except `patch_size` 4: every glyph is drawn in one neutral grey, and a 4 x 4 square two pixels
from a corner carries the red / green attribute. The colour is then seen by few units (those
whose receptive field covers the patch, a small share of each pooled activation) while the
outline fills the middle: if the paper's mechanism holds, a faithful bias score must find
those units and beat magnitude here. Model, training and every method as benchmark.py.

Runtime: the whole config (8 methods x 5 seeds) not yet measured (benchmark.py, the same
methods, seeds and image count: 56 min wall on the 2-core VM). BiasPruner and its magnitude
ablation alone (`--config.continual.methods="('biaspruner','biaspruner_magnitude')"`): 51 min
46 s wall, niced on the shared VM, 2026-12-03.

Measured result (that run; 5 seeds, mean +- SE): final ACC BiasPruner (the paper's score)
0.805 +- 0.042 vs magnitude 0.873 +- 0.018, on conflicting images 0.698 +- 0.063 vs 0.819 +-
0.038, EOdd 0.447 +- 0.112 vs 0.236 +- 0.094: within noise, the paper's score lower on each.
The unit analysis (benchmarks/RESULTS.md, issue 23) says why: the paper's score prunes shortcut
units less often than chance here (0.52 vs 0.65); class_conditional finds them (0.99), and
`patch.py:class_conditional` (11 min 09 s) reaches 0.858 +- 0.030, EOdd 0.312 +- 0.076: between
the two, within noise of both. `:absolute` (13 min 49 s; unit precision 0.96) 0.811 +- 0.054,
within noise of both; `:layer_normalised` (12 min 36 s) 0.805 +- 0.029, the paper's figure,
below magnitude on the conflicting images (0.712 vs 0.819, > 2 SE). No ranking beats magnitude
on this sequence."""

from jaxmed.config_check import sibling
from jaxmed.methods.biaspruner.scores import BIAS_SCORES

PATCH_SIZE = 4


def get_config(arg: str = ""):
    common = sibling(__file__)
    c = common.synthetic_config()
    c.data.synthetic_bias.patch_size = PATCH_SIZE
    if arg == "tiny":  # tests: data only, seconds
        common.tiny(c)
        c.data.synthetic_bias.patch_size = 3
    elif arg in BIAS_SCORES:
        common.bias_score_variant(c, arg)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '', 'tiny' or one of {BIAS_SCORES})")
    return c
