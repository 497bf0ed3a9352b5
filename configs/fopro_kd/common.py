"""Shared by the FoPro-KD configs: the paper's ISIC 2019 setting and the reference splits.

Configs load this file by path (`sibling(__file__)`), so they work from any working directory."""

from jaxmed.methods import fopro_kd

SPLITS = "../shared/splits/fopro_kd"  # {train,val,test}_skin{fold}_{imb}.csv, label `finding`
ALL_METHODS = fopro_kd.METHODS


def isic2019_config(imbalance: str, arg: str = ""):
    """The paper's ISIC 2019 protocol at one imbalance factor: ImageNet-stem ResNet-18 student
    from scratch at 224 px, Adam 3e-4, no weight decay, clip 5, batch 32, 100 epochs, w_kd 3,
    selection on val balanced accuracy; `arg` = the fold (1-5, default 1)."""
    fold = int(arg or 1)
    if not 1 <= fold <= 5:
        raise ValueError(f"fold {fold}: the FoPro-KD splits have folds 1-5")
    c = fopro_kd.default_config()
    c.data.name = "isic2019"
    c.data.split_file = f"{SPLITS}/train_skin{fold}_{imbalance}.csv"
    c.data.image_size = 224
    c.data.train_augment = "rrc(0.35)|flip|vflip|rotate(30)"
    c.data.num_workers = 8
    c.model.name = "resnet18"
    c.model.stem = "imagenet"
    c.train.eval_batch_size = 128
    c.train.early_stop_metric = "val/balanced_accuracy"
    c.train.early_stop_mode = "max"
    c.train.log_every = 100
    c.kd.methods = ALL_METHODS
    c.kd.seeds = (0, 1, 2)
    c.kd.teacher_model = "moco_v2_resnet50"  # + --config.kd.teacher=/models/moco_v2_800ep.pth
    c.kd.teacher_image_size = 224
    c.kd.fpg.steps = 1000
    return c
