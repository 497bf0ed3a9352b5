"""PruneCXR on NIH-CXR-LT (20 classes), the paper's protocol.

    jaxmed --config=configs/prunecxr/nih_cxr_lt.py --workdir=W \
        --config.data.root=/data/NIH-CXR \
        --config.model.pretrained=/models/resnet50-imagenet.pth

data.root holds the NIH ChestX-ray14 images (images_*/images/*.png), Data_Entry_2017.csv and
the NIH-CXR-LT label files miccai2023_nih-cxr-lt_labels_{train,val,test}.csv (or point
data.split_file at the train label file). model.pretrained: torchvision's ImageNet ResNet-50
state_dict (converted on load). 30 runs x (at most 60 epochs, early stopping on val loss,
patience 15) of ResNet-50 at 256 px, batch 256, Adam 1e-4, BCE; then 20 sparsities x {L1,
random}. Stages run separately with --config.stages="('sweep','analyze')"; existing models with
--config.prunecxr.checkpoints="('a.pt','b.pt')".

Runtime: not measured here (no dataset in this workplace). Estimate for one H100: ResNet-50 bf16
trains at ~4,900 img/s at 224 px (benchmarks/RESULTS.md), ~3,700 at 256 px, so ~20 s of compute
per epoch of ~68k images; decoding the 1024 px PNGs bounds it in practice, roughly a minute per
epoch with 16 workers: on the order of 10-20 GPU-hours for the 30 runs, plus ~1 min per run for
the sweep (2.6 s per 2,048 images x 20 levels on an H100).
Expected result: the reference's NIH correlations, e.g. log train frequency vs relative AP change
at 95% sparsity r 0.80 / rho 0.75, vs first 20% AP drop r 0.64 / rho 0.61 (report/summary.md
prints them beside ours).
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    common = sibling(__file__)
    c = common.paper_config("nih_cxr_lt")
    if arg:
        raise ValueError(f"unknown variant {arg!r}")
    return c
