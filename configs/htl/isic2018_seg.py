"""HTL on ISIC 2018 task 1 lesion segmentation (the paper's setting), GPU.

    jaxmed --config=configs/htl/isic2018_seg.py --workdir=W --config.data.root=/data/ISIC2018_Task1 \
           --config.model.pretrained=/models/resnet34-imagenet.pth

Runtime: about 1 h per run on one H100 at 256 px (3 methods x 3 seeds); not measured here (no
GPU run of this config yet).

ISIC 2018 task 1 (2,594 dermoscopic images with lesion masks, `ISIC_xxx.jpg` +
`ISIC_xxx_segmentation.png` under root, split 70/10/20 image-wise) at 256 px; a U-Net on an
ImageNet-initialised ResNet-34 trunk (torchvision file converted), Adam 1e-4, batch 16, 60
epochs, identification every 5 epochs at sparsities 0.3-0.9, HTL loss weight 2.

Expected result: the paper reports HTL attention gaining about 2-3% IoU over the same training
without it (test/iou, test/thresholded_jaccard in workdir/report/comparison.csv).
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    del arg
    c = sibling(__file__).segmentation_config(256, "unet_resnet34", 0, "imagenet")
    c.data.name = "isic2018_seg"
    c.data.train_augment = "flip|vflip|rotate(20)"
    c.data.num_workers = 8
    c.train.batch_size = 16
    c.train.eval_batch_size = 64
    c.train.epochs = 60
    c.train.lr = 1e-4
    c.train.early_stop_metric = "val/iou"
    c.train.early_stop_mode = "max"
    c.train.log_every = 50
    h = c.htl
    h.every_epochs = 5
    h.weight = 2.0
    h.identify_batch_size = 64
    return c
