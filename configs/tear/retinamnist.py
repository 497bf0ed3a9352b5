"""TEAR and the semi-supervised family on real images: RetinaMNIST with few labels, every
algorithm, 5 seeds.

    jaxmed --config=configs/tear/retinamnist.py --workdir=workdirs/tear_retinamnist

Data: ../shared/data/retinamnist.npz (MedMNIST v2, Yang et al. 2023, CC BY 4.0; DeepDRiD fundus
photographs, 28 px RGB, 5 ordinal diabetic-retinopathy grades; train 1,080: 486 / 128 / 206 /
194 / 66, val 120, test 400); any other single-label MedMNIST file by
`--config.data.root=<file>.npz` (the class count and names come from the data). 100 training
images are labeled (about 9%, stratified with the classes' proportions, at least one per
class, `ssl.split_seed` 0: 45 / 12 / 19 / 18 / 6; `ssl.num_labeled` is a total, so USB's equal
labels per class is not available), the whole training split is the unlabeled stream (USB's
include_lb_to_ulb). CIFAR ResNet-8 (width 16), Adam 3e-3 with the
FixMatch cosine, wd 5e-4, B 16 labeled + mu 3 x 16 unlabeled (weak and strong views) per step,
4,000 steps, validation every 500, the last model tested: the EMA model (momentum 0.999, USB's),
the raw student beside it (test/student/...). USB's EMAs (0.999) and threshold (0.95).

Why this length: the quick config's 300 steps are too short for FlexMatch / FreeMatch /
SoftMatch, whose thresholds follow the model's confidence (FlexMatch admitted every unlabeled
image at step 10 with 0.19 pseudo-label accuracy, about 8 passes over the unlabeled images in
all); here they get 4,000 steps, 178 passes (4,000 x 48 / 1,080), and the report's figures
(mask rate and pseudo-label accuracy over training, per algorithm) show whether each one's
curriculum engaged or collapsed.

Runtime: NOT RUN as a whole this session; it is too long for the 2-core CPU. Measured: one
seed of FixMatch (`--config.ssl.methods="('fixmatch',)" --config.ssl.seeds="(0,)"`, empty
workdir, 2026-12-03, the VM shared with other jobs, load 7-8): 18 min 14 s wall, 1,034 CPU s,
1.2 GB peak RSS (~3.7 steps/s; the strong view's RandAugment runs on the host). The whole
comparison is 11 algorithms x 5 seeds = 55 runs of about that length (supervised-only draws
no unlabeled views and is cheaper; the others not measured): about 16 h wall on this shared VM,
~8 h of an idle 2-core machine (55 x 1,034 CPU s / 2); not measured on a GPU. That one run:
test AUC 0.647 (EMA; raw student 0.628), accuracy 0.443, balanced accuracy 0.293, grade-4
recall 0.05; FixMatch's mask rate rose 0.04 (step 50) -> 0.29 (500) ->
0.45 (1,000) -> 0.61 (4,000) with pseudo-label accuracy over all unlabeled images ~0.45 and
0.59-0.77 on the masked ones (its fixed 0.95 threshold admits more images as the model grows
confident, without collapse). Seed 0 of two more, same way (run beside each other):
supervised-only 4 min 44 s wall, 138 CPU s: test AUC 0.648 (raw 0.615), accuracy 0.453,
balanced 0.276, grade-4 recall 0.00; FlexMatch 21 min 27 s wall, 1,044 CPU s: test AUC 0.667
(raw 0.638), accuracy 0.435, balanced 0.301, grade-4 recall 0.10. FlexMatch's mask rate is
1.00 for the first 500 steps (its warm-up maps the thresholds near 0 while most unlabeled
images are still unused) and 0.81-0.91 after, at pseudo-label accuracy 0.45-0.49, about the
head grade's share of the split (0.45): it admits nearly every image, with pseudo-labels no
more accurate than always naming grade 0, so its curriculum does not engage even at this
length (its test AUC is nonetheless not below supervised-only at this seed). One seed each:
no verdict; FreeMatch / SoftMatch not measured.
"""

from jaxmed.config_check import sibling

common = sibling(__file__)

DATA = "../shared/data/retinamnist.npz"


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"unknown variant {arg!r} (this config has none)")
    c = common.paper_config()
    c.data.name = "medmnist"
    c.data.root = DATA
    c.model.name, c.model.width = "resnet8", 16
    t = c.train
    t.optimizer, t.lr, t.weight_decay = "adam", 3e-3, 5e-4
    t.batch_size, t.eval_batch_size, t.steps = 16, 200, 4000
    t.log_every, t.eval_every, t.checkpoint_every = 50, 500, 500
    t.progress = False
    ss = c.ssl
    ss.num_labeled, ss.split_seed, ss.mu = 100, 0, 3
    ss.weak_augment = "translate(2)|flip"
    ss.strong_augment = "translate(2)|flip|randaugment(2,10)|cutout(8)"
    ss.cutout = 8
    ss.methods = common.ALL_METHODS
    ss.seeds = (0, 1, 2, 3, 4)
    return c
