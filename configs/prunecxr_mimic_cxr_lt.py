"""PruneCXR on MIMIC-CXR-LT (19 classes), the paper's protocol.

    jaxmed --config=configs/prunecxr_mimic_cxr_lt.py --workdir=W \
        --config.data.root=/data/mimic-cxr-jpg-2.0.0 \
        --config.model.pretrained=/models/resnet50-imagenet.pth

data.root is the MIMIC-CXR-JPG 2.0.0 root (the label files' `path` column is relative to it)
holding the MIMIC-CXR-LT label files miccai2023_mimic-cxr-lt_labels_{train,val,test}.csv (or
point data.split_file at the train label file). model.pretrained: torchvision's ImageNet ResNet-50
state_dict (converted on load). 30 runs x (at most 60 epochs, early stopping on val loss,
patience 15) of ResNet-50 at 256 px, batch 256, Adam 1e-4, BCE; then 20 sparsities x {L1,
random}. Stages run separately with --config.stages=sweep,analyze; existing models with
--config.prunecxr.checkpoints=a.pt,b.pt,... Expected: the reference's correlations (e.g. log
train frequency vs first 20% AP drop r 0.82, rho 0.93).
"""

from jaxmed.methods import prunecxr


def get_config(arg: str = ""):
    c = prunecxr.paper_config("mimic_cxr_lt")
    if arg:
        raise ValueError(f"unknown variant {arg!r}")
    return c
