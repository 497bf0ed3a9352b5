"""Quickstart: ResNet-18 (small stem) on the built-in synthetic 64 px lesion dataset.

    jaxmed --config=configs/quickstart.py --workdir=workdirs/quickstart

About 90 seconds on 2 CPU cores; test balanced accuracy >= 0.9. `configs/quickstart.py:tiny`
is a 20-second smoke run. Any dataset works the same way, e.g. a MedMNIST file:
    --config.data.name=medmnist --config.data.root=pneumoniamnist.npz
"""

from jaxmed.methods import supervised


def get_config(arg: str = ""):
    config = supervised.default_config()
    config.data.name = "synthetic"
    config.data.image_size = 64
    config.data.train_augment = "flip"
    config.data.synthetic.num_classes = 4
    config.data.synthetic.num_train = 1024
    config.data.synthetic.num_val = 256
    config.data.synthetic.num_test = 512
    config.model.name = "resnet18"
    config.model.stem = "small"
    config.model.width = 16
    config.train.batch_size = 64
    config.train.eval_batch_size = 128
    config.train.epochs = 2
    config.train.optimizer = "adam"
    config.train.lr = 2e-3
    config.train.schedule = "cosine"
    config.train.log_every = 8
    config.train.early_stop_metric = "val/loss"
    if arg == "tiny":
        config.data.image_size = 32
        config.data.synthetic.num_train = 256
        config.data.synthetic.num_val = 64
        config.data.synthetic.num_test = 64
        config.model.width = 8
        config.train.batch_size = 32
        config.train.epochs = 1
    elif arg:
        raise ValueError(f"unknown quickstart variant {arg!r} (use '' or 'tiny')")
    return config
