"""BiasPruner on NIH ChestX-ray14 with the reference's GbP splits: No Finding vs Pneumothorax,
biased by sex (800/80/80/800 in training, 200 per cell in test), then the bias flipped.

    jaxmed --config=configs/biaspruner/nih.py --workdir=W --config.data.root=/data/NIH-CXR

data.root: the NIH download (images_*/images/*.png). Splits default to
../shared/splits/biaspruner/GbP/ (override continual.task_split_files).

Runtime: 7 methods x 2 tasks x 40 epochs of 1,760 images at 224 px: roughly an hour on one
H100 (not measured: no real data here). Expected result (the paper's claim, not reproduced
here): BiasPruner's EOdd by sex below fine-tuning's and PackNet's at similar ACC.
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    common = sibling(__file__)
    c = common.real_data_config("nih_cxr14", "flip|rotate(10)", epochs=20)
    cc = c.continual
    cc.task_split_files = common.reference_splits(
        "GbP", "total_biased_train_set_split.csv", "flipped_total_biased_train_set_split.csv")
    cc.sensitive_attr = "sex"
    if arg:
        raise ValueError(f"unknown variant {arg!r}")
    return c
