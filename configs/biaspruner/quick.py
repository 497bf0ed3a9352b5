"""BiasPruner and every continual baseline on a synthetic biased task sequence, CPU, minutes.

    jaxmed --config=configs/biaspruner/quick.py --workdir=workdirs/biaspruner_quick

Runtime: 5.5 min on a 2-core CPU VM (7 methods x 2 tasks, report in workdir/report/);
`:tiny` (the tests' variant) runs in well under a minute.

Two binary tasks (classes 0/1, then 2/3) of 32 px synthetic lesions whose classes differ only by
outline, while the background tone (the attribute `bias`, like skin type) matches the label in
95% of training images and 50% of test images. Runs BiasPruner, the magnitude ablation,
PackNet, fine-tune, joint, EWC and LwF on a CIFAR ResNet-8 (width 16).

Expected result (benchmarks/RESULTS.md): BiasPruner has the smallest EOdd (0.41, against 1.05
for fine-tuning, 1.97 for PackNet, 0.79 for the magnitude ablation with the same re-weighting),
but its accuracy (final ACC 0.33, task-aware 0.56) is within noise of the baselines: each task
has only ~30 bias-conflicting training images to learn the outline from, and entropy task
selection between two binary shape tasks is at chance (0.52), so task-agnostic ACC mostly
measures selection. With 2,000 images per task plain fine-tuning learns the outline itself.
"""

from jaxmed.methods import biaspruner


def get_config(arg: str = ""):
    c = biaspruner.default_config()
    c.data.name = "synthetic"
    c.data.image_size = 32
    c.data.train_augment = "flip"
    s = c.data.synthetic
    s.num_classes = 4
    s.class_cue = "shape"
    s.bias_rate = 0.95
    s.test_bias_rate = 0.5
    s.num_train, s.num_val, s.num_test = 1200, 64, 400
    c.model.name = "resnet8"
    c.model.width = 16
    c.train.batch_size = 64
    c.train.eval_batch_size = 200
    c.train.optimizer = "adam"
    c.train.lr = 1e-3
    c.train.weight_decay = 5e-4
    c.train.log_every = 25
    c.train.progress = False
    cc = c.continual
    cc.tasks = ((0, 1), (2, 3))
    cc.methods = biaspruner.ALL_METHODS
    cc.sensitive_attr = "bias"
    cc.biased_epochs = 3
    cc.finetune_epochs = 8
    cc.gamma = 0.3
    cc.alpha = 2.0  # up-weight the samples the biased model gets wrong
    if arg == "tiny":  # tests: seconds
        s.num_train, s.num_val, s.num_test = 128, 16, 64
        c.data.image_size = 16
        c.model.name, c.model.width = "resnet8", 4
        c.train.batch_size, c.train.eval_batch_size = 16, 32
        cc.biased_epochs = cc.finetune_epochs = 1
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '' or 'tiny')")
    return c
