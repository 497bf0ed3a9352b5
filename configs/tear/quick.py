"""TEAR and the semi-supervised family on synthetic lesions with about 5% labels, CPU, minutes.

    jaxmed --config=configs/tear/quick.py --workdir=workdirs/tear_quick

Runtime: 8 min 42 s on the 2-core CPU VM (11 algorithms x 2 seeds, measured 2026-11-25;
report in workdir/report/); `:tiny` (the tests' variant) runs in seconds.

Data: 6 classes of 32 px synthetic lesions that differ only by outline (class_cue 'shape'),
1,800 training images of which 90 (5%, stratified, split_seed 0) are labeled and the rest
unlabeled; 120 val, 600 test. CIFAR ResNet-8 (width 8), Adam 3e-3 with the FixMatch cosine,
B 16 labeled + mu 3 x 16 unlabeled (weak and strong views) per step, 300 steps. The EMAs
(teacher, FreeMatch / SoftMatch statistics) use 0.99 instead of 0.999: 300 steps, not 1M.

Expected result (benchmarks/RESULTS.md), measured before the EMA evaluation and the labeled
images in the unlabeled stream became the defaults (USB's; `--config.ssl.eval_ema=False
--config.ssl.include_labeled_in_unlabeled=False` is the earlier behaviour; not rerun with the
new defaults yet): test AUC supervised-only 0.846 +- 0.027, FixMatch 0.900 +- 0.004, TEAR 0.902 +- 0.000 (2 seeds: the
kit's verdict rule needs 3, so the report says "too few seeds"); FlexMatch / FreeMatch / SoftMatch
collapse in 300 steps (thresholds that start near 0 admit wrong pseudo-labels early). See
workdir/report/summary.md for the verdicts and figures.
"""

from jaxmed.config_check import sibling

common = sibling(__file__)


def get_config(arg: str = ""):
    c = common.paper_config()
    c.data.name = "synthetic"
    c.data.image_size = 32
    s = c.data.synthetic
    s.num_classes, s.class_cue = 6, "shape"
    s.num_train, s.num_val, s.num_test = 1800, 120, 600
    c.model.name, c.model.width = "resnet8", 8
    t = c.train
    t.optimizer, t.lr, t.weight_decay = "adam", 3e-3, 5e-4
    t.batch_size, t.eval_batch_size, t.steps = 16, 200, 300
    t.log_every, t.eval_every, t.checkpoint_every = 25, 100, 100
    t.progress = False
    ss = c.ssl
    ss.num_labeled, ss.split_seed, ss.mu = 90, 0, 3
    ss.weak_augment = "translate(2)|flip"
    ss.strong_augment = "translate(2)|flip|randaugment(2,10)|cutout(8)"
    ss.cutout = 8
    ss.ema_p = ss.teacher_momentum = 0.99
    ss.seeds = (0, 1)
    if arg == "tiny":  # tests: seconds
        s.num_classes = 3
        s.num_train, s.num_val, s.num_test = 96, 16, 32
        c.data.image_size = 16
        c.model.width = 4
        t.batch_size, t.eval_batch_size, t.steps = 8, 16, 6
        t.log_every, t.eval_every, t.checkpoint_every = 2, 3, 2
        ss.num_labeled, ss.mu = 12, 2
        ss.methods, ss.seeds = ("supervised", "fixmatch", "tear"), (0, 1)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '' or 'tiny')")
    return c
