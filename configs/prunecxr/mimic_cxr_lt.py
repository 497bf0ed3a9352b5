"""PruneCXR on MIMIC-CXR-LT (19 classes), the paper's protocol.

    jaxmed --config=configs/prunecxr/mimic_cxr_lt.py --workdir=W \
        --config.data.root=/data/mimic-cxr-jpg-2.0.0 \
        --config.model.pretrained=/models/resnet50-imagenet.pth

data.root is the MIMIC-CXR-JPG 2.0.0 root (the label files' `path` column is relative to it)
holding the MIMIC-CXR-LT label files miccai2023_mimic-cxr-lt_labels_{train,val,test}.csv (or
point data.split_file at the train label file). model.pretrained: torchvision's ImageNet ResNet-50
state_dict (converted on load). 30 runs x (at most 60 epochs, early stopping on val loss,
patience 15) of ResNet-50 at 256 px, batch 256, Adam 1e-4, BCE; then 20 sparsities x {L1,
random}. Stages run separately with --config.stages="('sweep','analyze')"; existing models with
--config.prunecxr.checkpoints="('a.pt','b.pt')".

Runtime: not measured here (no dataset in this workplace). Estimate for one H100: about 2.7x
the NIH-CXR-LT study (~180k training images instead of ~68k), i.e. on the order of 30-50
GPU-hours for the 30 runs (JPEG decoding bound), plus a few minutes per run for the sweep.
Expected result: the reference's MIMIC correlations, e.g. log train frequency vs first 20% AP
drop r 0.82 / rho 0.93, vs relative AP change at 95% r 0.76 / rho 0.75 (report/summary.md
prints them beside ours).
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    common = sibling(__file__)
    c = common.paper_config("mimic_cxr_lt")
    if arg:
        raise ValueError(f"unknown variant {arg!r}")
    return c
