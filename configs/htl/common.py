"""Shared by the HTL configs: the segmentation setting of Attend Who is Weak.

Configs load this file by path (`jaxmed.config_check.sibling`), so they work from any working
directory."""

from jaxmed.methods import htl


def segmentation_config(image_size: int, model: str, width: int, stem: str):
    """HTL segmentation: U-Net on a ResNet trunk, Adam, flip-only augmentation (masks follow),
    baseline vs loss weighting vs oversampling of the HTL samples."""
    c = htl.default_config()
    c.htl.task = "segmentation"
    c.data.image_size = image_size
    c.data.train_augment = "flip"
    c.model.name = model
    c.model.width = width
    c.model.stem = stem
    c.train.optimizer = "adam"
    c.train.progress = False
    c.train.eval_every = -1  # validation once, at the end
    return c
