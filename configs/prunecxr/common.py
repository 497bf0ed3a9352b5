"""Shared by configs/prunecxr/*.py (not a config itself): the paper's protocol on a CXR-LT
label set. Config files are loaded by path (ml_collections), so they load this file from
their own directory (`jaxmed.config_check.sibling`) rather than by package import."""

from jaxmed.methods import prunecxr


def paper_config(dataset: str):
    """30 runs of an ImageNet-stem ResNet-50 at 256 px (bf16), batch 256, Adam 1e-4, BCE, at
    most 60 epochs with early stopping on validation loss (patience 15); then 20 sparsities x
    {L1, random}."""
    c = prunecxr.default_config()
    c.data.name = dataset
    c.data.image_size = 256
    c.data.channels = 3
    c.data.train_augment = "flip|rotate(15)"
    c.data.num_workers = 16
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.dtype = "bfloat16"
    c.train.optimizer = "adam"
    c.train.lr = 1e-4
    c.train.weight_decay = 0.0
    c.train.batch_size = 256
    c.train.eval_batch_size = 256
    c.train.epochs = 60
    c.train.early_stop_metric = "val/loss"
    c.train.patience = 15
    c.train.log_every = 50
    c.prunecxr.num_runs = 30
    # 30 ResNet-50 runs at 224 px do not fit one program's memory: one after another
    c.prunecxr.parallel_seeds = False
    c.prunecxr.chunk = 5
    c.prunecxr.sweep_batch_size = 64
    return c

