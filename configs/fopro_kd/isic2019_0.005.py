"""FoPro-KD on ISIC 2019 long-tailed at imbalance factor 0.005 (the paper's protocol), every
method of the comparison, 3 seeds on one fold.

    jaxmed --config=configs/fopro_kd/isic2019_0.005.py --workdir=W --config.data.root=/data/ISIC2019 \
        --config.kd.teacher=/models/moco_v2_800ep_pretrain.pth.tar

`:N` picks fold N (1-5; the folds are independent resamples, run each for the mean +- std over
folds). data.root: the ISIC 2019 training images (ISIC_xxxxxxx.jpg anywhere below it); the split
CSVs come from ../shared/splits/fopro_kd/ (label column `finding`, 0 NV ... 7 DF). A DINOv2
teacher: --config.kd.teacher=/models/dinov2_vits14.pth --config.kd.teacher_model=dinov2_vits14.

Runtime: 11 methods x 3 seeds x 100 epochs of ~20k (0.002) to ~21k images at 224 px, plus the
teacher's ResNet-50 forward per step: many GPU-hours (not measured: no ISIC images or MoCo
weights here). Expected result (the paper's claim, not reproduced here): EKD and EKD + FPG above
the long-tailed baselines in balanced accuracy and tail accuracy, most at the strongest
imbalance.
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    return sibling(__file__).isic2019_config("0.005", arg)
