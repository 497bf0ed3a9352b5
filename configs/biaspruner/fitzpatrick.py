"""BiasPruner on Fitzpatrick17k with the reference's splits: benign vs malignant, biased by skin
tone (89% aligned in training, balanced test), then the same task with the bias flipped.

    jaxmed --config=configs/biaspruner/fitzpatrick.py --workdir=W \
        --config.data.root=/data/fitzpatrick17k [--config.model.pretrained=/models/resnet18.pth]

data.root: the folder with the images named <md5hash>.jpg (fitzpatrick17k.csv is not needed:
the split files carry the labels). `:resnet56` uses the reference's CIFAR ResNet-56 at 64 px.
Splits default to ../shared/splits/biaspruner/fitz/ (override continual.task_split_files).

Runtime: 7 methods x 2 tasks x 60 epochs of ~1,100 images at 224 px: roughly an hour on one
H100 (not measured: no real data here). Expected result (the paper's claim, not reproduced
here): BiasPruner's EOdd well below fine-tuning's and PackNet's at similar or better ACC.
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    common = sibling(__file__)
    c = common.real_data_config("fitzpatrick17k", "rrc(0.5)|flip|rotate(15)", epochs=30)
    cc = c.continual
    cc.task_split_files = common.reference_splits(
        "fitz", "fitz_biased_train_set_split.csv", "flipped_total_biased_train_set_split.csv")
    cc.sensitive_attr = "skin_group"
    cc.gamma = 0.3
    if arg == "resnet56":
        c.model.name = "resnet56"
        c.data.image_size = 64
        c.data.train_augment = "translate(4)|flip"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (use '' or 'resnet56')")
    return c
