"""PruneCXR on synthetic long-tailed multi-label data: the whole study in minutes on a CPU.

    jaxmed --config=configs/prunecxr/quick.py --workdir=workdirs/prunecxr_quick

3 runs of a small ResNet-18 (small stem, width 8) on 32 px synthetic images with 8 findings
whose prevalence falls 20x from head to tail; 20 sparsities x {L1, random}; the report lands in
workdirs/prunecxr_quick/report/.

Runtime: about 3 minutes on 2 CPU cores from scratch (2 min 40 s to 3 min 20 s measured).
Expected result (report/summary.md): dense test mAP 0.532 ± 0.094 over the 3 runs; at 95%
sparsity 0.151 (L1) and 0.143 (random); the first 20% AP drop comes at sparsity 0.30-0.90 under
L1 pruning but already at 0.05-0.15 under random pruning; log training frequency vs first 20%
AP drop (L1) r 0.46 / rho 0.58 (8 classes: p 0.25 / 0.13, too few for a verdict); 25 PIEs, 88%
of them without any finding (29% of the other images).

`:tiny` (tests, seconds): 5 classes, 16 px, ResNet-8 width 4, 2 runs of 2 epochs.
"""

from jaxmed.methods import prunecxr


def get_config(arg: str = ""):
    c = prunecxr.default_config()
    c.data.name = "synthetic"
    c.data.image_size = 32
    c.data.train_augment = "flip"
    s = c.data.synthetic
    s.multi_label = True
    s.num_classes = 8
    s.imbalance = 0.05
    s.test_imbalance = 0.05
    s.num_train, s.num_val, s.num_test = 1536, 256, 512
    c.model.name = "resnet18"
    c.model.stem = "small"
    c.model.width = 8
    c.train.loss = "bce"
    c.train.optimizer = "adam"
    c.train.lr = 2e-3
    c.train.batch_size = 64
    c.train.eval_batch_size = 128
    c.train.epochs = 6
    c.train.early_stop_metric = "val/loss"
    c.train.patience = 3
    c.train.log_every = 12
    c.prunecxr.num_runs = 3
    c.prunecxr.chunk = 10
    c.prunecxr.sweep_batch_size = 128
    if arg == "tiny":  # for tests: seconds
        s.num_classes = 5
        s.num_train, s.num_val, s.num_test = 128, 32, 64
        c.data.image_size = 16
        c.model.name, c.model.width = "resnet8", 4
        c.train.batch_size, c.train.epochs = 32, 2
        c.prunecxr.num_runs = 2
        c.prunecxr.sweep_batch_size = 32
        c.prunecxr.pie_fraction = 0.1
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '' or 'tiny')")
    return c
