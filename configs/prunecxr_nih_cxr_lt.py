"""PruneCXR on NIH-CXR-LT (20 classes), the paper's protocol.

    jaxmed --config=configs/prunecxr_nih_cxr_lt.py --workdir=W \
        --config.data.root=/data/NIH-CXR \
        --config.model.pretrained=/models/resnet50-imagenet.pth

data.root holds the NIH ChestX-ray14 images (images_*/images/*.png), Data_Entry_2017.csv and
the NIH-CXR-LT label files miccai2023_nih-cxr-lt_labels_{train,val,test}.csv (or point
data.split_file at the train label file). model.pretrained: torchvision's ImageNet ResNet-50
state_dict (converted on load). 30 runs x (at most 60 epochs, early stopping on val loss,
patience 15) of ResNet-50 at 256 px, batch 256, Adam 1e-4, BCE; then 20 sparsities x {L1,
random}. Stages run separately with --config.stages=sweep,analyze; existing models with
--config.prunecxr.checkpoints=a.pt,b.pt,... Expected: the reference's correlations (e.g. log
train frequency vs relative AP change at 95% sparsity r 0.80, rho 0.75).
"""

from jaxmed.methods import prunecxr


def get_config(arg: str = ""):
    c = prunecxr.paper_config("nih_cxr_lt")
    if arg:
        raise ValueError(f"unknown variant {arg!r}")
    return c
