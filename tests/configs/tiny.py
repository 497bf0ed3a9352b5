"""A seconds-long supervised run for tests: 16 px synthetic data, a CIFAR ResNet-8 of width 4."""

from jaxmed.methods import supervised


def get_config(arg: str = ""):
    c = supervised.default_config()
    c.data.image_size = 16
    c.data.synthetic.num_classes = 3
    c.data.synthetic.num_train = 96
    c.data.synthetic.num_val = 24
    c.data.synthetic.num_test = 24
    c.model.name = "resnet8"
    c.model.width = 4
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.train.epochs = 2  # 12 steps
    c.train.lr = 3e-3
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.progress = False
    if arg == "pruned_workers":  # gradual pruning mid-schedule + grain worker processes
        c.pruning.criterion, c.pruning.schedule = "magnitude", "gradual"
        c.pruning.target, c.pruning.start_step, c.pruning.end_step = 0.75, 2, 10
        c.pruning.frequency = 2
        c.data.num_workers = 2
        c.data.train_augment = "flip"
    if arg == "multilabel":
        c.data.synthetic.multi_label = True
        c.data.synthetic.num_classes = 5
        c.train.loss = "bce"
    return c
