"""HTL on synthetic lesion segmentation with a rare hard sub-population, CPU, minutes.

    jaxmed --config=configs/htl/quick.py --workdir=workdirs/htl_quick

Runtime: 10 min 21 s wall, 593 CPU s on the 2-core VM while another job shared it (measured
2026-11-25); `:tiny` (the tests' variant) runs in well under a minute; `:tiny_ssl` is the
tests' semi-supervised variant (HTL among unlabeled samples on TEAR's FixMatch step, seconds).

32 px synthetic lesions with masks; 8% of the images are hard (low-contrast lesions,
attrs['hard'] = 1), in training and test alike. A U-Net on a small-stem ResNet-18 trunk (width
8) trains 12 epochs with Dice + BCE; every 2 epochs the HTL set is identified by global
magnitude pruning at 30-90% (the 10% of images with the lowest mean IoU between dense and
pruned masks: the majority rule at IoU 0.5 marks nobody, since hard lesions break only at
>= 70% sparsity) and attended until the next identification (loss x3, or drawn 3x as often).
3 methods x 3 seeds.

Expected result (workdir/report/summary.md; benchmarks/RESULTS.md): IoU on the hard lesions
(test/hard_1/iou) baseline 0.7225 +- 0.0133, htl_weight 0.7481 +- 0.0058 (better: the gap
exceeds 2 SE of the difference), htl_oversample 0.7341 +- 0.0145 (within noise); overall IoU
~0.972 for all.
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    c = sibling(__file__).segmentation_config(32, "unet_resnet18", 8, "small")
    c.data.name = "synthetic"
    s = c.data.synthetic
    s.with_mask = True
    s.hard_rate = 0.08
    s.hard_kind = "low_contrast"
    s.num_train, s.num_val, s.num_test = 1200, 64, 600
    c.train.batch_size = 32
    c.train.eval_batch_size = 200
    c.train.epochs = 12
    c.train.lr = 2e-3
    c.train.log_every = 50
    h = c.htl
    h.methods = ("baseline", "htl_weight", "htl_oversample")
    h.seeds = (0, 1, 2)
    h.every_epochs = 2
    h.sparsities = (0.3, 0.5, 0.7, 0.9)
    h.weight = 3.0
    h.top_q = 0.1  # the majority rule marks nobody here (hard lesions break only at >= 70%)
    h.identify_batch_size = 200
    if arg == "tiny":  # tests: seconds
        s.num_train, s.num_val, s.num_test = 64, 16, 48
        c.data.image_size = 16
        c.model.width = 4
        c.train.batch_size, c.train.eval_batch_size = 16, 16
        c.train.epochs = 2
        h.every_epochs = 1
        h.seeds = (0, 1)
        h.identify_batch_size = 32
        h.grid = 3
    elif arg == "tiny_ssl":  # tests: HTL among unlabeled samples on TEAR's FixMatch step
        c.htl.task, h.ssl_algorithm = "semi_supervised", "fixmatch"
        c.model.name, c.model.width = "resnet8", 4
        s.with_mask, s.hard_rate, s.num_classes = False, 0.0, 3
        s.num_train, s.num_val, s.num_test = 96, 16, 32
        c.data.image_size = 16
        c.train.batch_size, c.train.eval_batch_size, c.train.epochs = 8, 16, 2
        c.train.checkpoint_every = 5
        c.ssl.num_labeled, c.ssl.mu = 12, 2  # 84 unlabeled: 5 steps per epoch
        c.ssl.weak_augment, c.ssl.strong_augment = "flip", "flip|cutout(4)"
        h.methods, h.seeds = ("baseline", "htl_weight"), (0,)
        h.every_epochs, h.top_q = 1, 0.25  # one identification (step 5): 21 of 84 samples
        h.identify_batch_size, h.grid = 16, 3
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '', 'tiny' or 'tiny_ssl')")
    return c
