"""TEAR on ISIC 2018 task 3 with the paper's reference split lists (350 labeled images).

    jaxmed --config=configs/tear/isic2018.py --workdir=workdirs/tear_isic2018 \
        --config.data.root=/data/isic2018

`:N` picks the labeled set (350, 600, 800, 1200, 2000; default 350): train on
`TrainN.txt` (labeled) + `Train_unlN.txt` (unlabeled), select on `Val.txt`, report on
`Test.txt` (../shared/splits/tear/). Paper settings: the small "AlexNet" at 128 px, SGD
Nesterov lr 1e-3 cos(7 pi k / 16 K), wd 5e-4, B 128, mu 7, 256 epochs of 3560 // 128 = 27
steps (6,912 steps), threshold 0.95, EMA 0.999, AdaPL and IPH weights 0.1.

Runtime: about 8 h on one GPU per method and seed (11 methods x 3 seeds).
Expected result: TEAR above FixMatch + DA, both above supervised-only on test AUC (paper
Table 1, 350 labels: AUC about 0.88 for TEAR); no run of ours on the real data yet.
"""

from jaxmed.config_check import sibling

common = sibling(__file__)


def get_config(arg: str = ""):
    n = int(arg or 350)
    if n not in (350, 600, 800, 1200, 2000):
        raise ValueError(f"unknown labeled-set size {arg!r}: 350, 600, 800, 1200 or 2000")
    c = common.paper_config()
    c.data.name = "isic2018"
    c.data.root = "/data/isic2018"
    c.data.split_file = f"{common.SPLITS}/Train{n}.txt"  # val / test: Val.txt, Test.txt
    c.data.image_size = 128
    c.data.num_workers = 8
    c.model.name = "alexnet"
    c.train.steps = 256 * (3560 // 128)
    c.train.eval_every = 3560 // 128
    c.train.early_stop_metric, c.train.early_stop_mode = "val/auc", "max"
    c.ssl.labeled_list = f"{common.SPLITS}/Train{n}.txt"
    c.ssl.unlabeled_list = f"{common.SPLITS}/Train_unl{n}.txt"
    c.ssl.weak_augment = "rotate(10)|translate(13)|flip"  # 10% of 128 px
    c.ssl.strong_augment = "translate(4)|flip|randaugment(2,10)|cutout(16)"
    c.ssl.strong_on_device = False  # host PIL: 8.6x faster than jnp on CPU (GPU unmeasured)
    c.ssl.seeds = (0, 1, 2)
    return c
