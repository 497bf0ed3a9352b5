"""FoPro-KD and every baseline on a synthetic long tail, CPU, minutes.

    jaxmed --config=configs/fopro_kd/quick.py --workdir=workdirs/fopro_kd_quick

Stage 1 trains a teacher (CIFAR ResNet-8, width 16) on balanced synthetic data of the same
kind into workdir/teacher (it plays the pretrained foundation model: it has seen every class
often); then all 11 methods x 3 seeds train a CIFAR ResNet-8 (width 8) student on a long tail
(6 classes, 32 px lesions that differ only by outline, imbalance 0.01: 1,000 training images,
the rarest class ~6) and are tested on a balanced test set. Report in workdir/report/.

Runtime: see benchmarks/RESULTS.md (target: under 15 minutes on 2 CPU cores).
Expected result (report/summary.md): EKD and EKD + FPG above student-only balanced softmax
on tail accuracy by more than the seed spread.

`:tiny` (tests, seconds): 4 classes, 16 px, ResNet-8 width 4, 1 seed, a few steps per method.
"""

from jaxmed.methods import fopro_kd


def get_config(arg: str = ""):
    c = fopro_kd.default_config()
    c.data.name = "synthetic"
    c.data.image_size = 32
    c.data.train_augment = "flip"
    s = c.data.synthetic
    s.num_classes = 6
    s.class_cue = "shape"
    s.imbalance = 0.01
    s.test_imbalance = 1.0
    s.num_train, s.num_val, s.num_test = 1000, 60, 600
    c.model.name = "resnet8"
    c.model.width = 8
    c.train.batch_size = 50
    c.train.eval_batch_size = 200
    c.train.epochs = 10
    c.train.lr = 2e-3
    c.train.eval_every = -1
    c.train.log_every = 20
    c.train.progress = False
    kd = c.kd
    kd.methods = fopro_kd.METHODS
    kd.seeds = (0, 1, 2)
    kd.projector_hidden = 64
    kd.ldam_scale = 10.0
    kd.fpg.steps = 60
    kd.fpg.lr = 2e-2
    ts = kd.teacher_stage
    ts.epochs, ts.num_train, ts.model, ts.width, ts.lr = 6, 2000, "resnet8", 16, 2e-3
    if arg == "tiny":
        c.data.image_size = 16
        s.num_classes = 4
        s.num_train, s.num_val, s.num_test = 120, 16, 40
        s.imbalance = 0.1
        c.model.width = 4
        c.train.batch_size = 20
        c.train.eval_batch_size = 20
        c.train.epochs = 1
        c.train.steps = 3
        c.train.log_every = 1
        kd.seeds = (0,)
        kd.projector_hidden = 8
        kd.fpg.steps = 2
        kd.report_examples = 2
        ts.epochs, ts.num_train, ts.model, ts.width = 1, 60, "resnet8", 4
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '' or 'tiny')")
    return c
