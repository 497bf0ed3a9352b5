"""BiasPruner on NIH ChestX-ray14 with the reference's GbP splits: No Finding vs Pneumothorax,
biased by sex (800/80/80/800 in training, 200 per cell in test), then the bias flipped.

    jaxmed --config=configs/biaspruner_nih.py --workdir=W --config.data.root=/data/NIH-CXR

data.root: the NIH download (images_*/images/*.png). Splits default to
../shared/splits/biaspruner/GbP/ (override continual.task_split_files).
"""

from jaxmed.methods import biaspruner

SPLITS = "../shared/splits/biaspruner/GbP"


def get_config(arg: str = ""):
    c = biaspruner.real_data_config("nih_cxr14", "flip|rotate(10)", epochs=20)
    cc = c.continual
    cc.task_split_files = (f"{SPLITS}/total_biased_train_set_split.csv|"
                           f"{SPLITS}/flipped_total_biased_train_set_split.csv")
    cc.sensitive_attr = "sex"
    if arg:
        raise ValueError(f"unknown variant {arg!r}")
    return c
