"""Shared by the TEAR configs: the paper's training recipe and the reference split lists.

Configs load this file by path (`jaxmed.config_check.sibling`), so they work from any
working directory."""

from jaxmed.methods import tear

SPLITS = "../shared/splits/tear"  # TEAR's TrainN.txt / Train_unlN.txt / Val.txt / Test.txt
ALL_METHODS = ("supervised", "pseudo_label", "mean_teacher", "fixmatch", "fixmatch_da",
               "flexmatch", "freematch", "softmatch", "tear_adapl", "tear_iph", "tear")


def paper_config():
    """The TEAR reference recipe: SGD Nesterov 0.9, wd 5e-4 (not BN), lr 1e-3 with
    cos(7 pi k / 16 K), B 128, mu 7, threshold 0.95, EMA 0.999, DA queue 32."""
    c = tear.default_config()
    t = c.train
    t.optimizer, t.nesterov, t.momentum = "sgd", True, 0.9
    t.lr, t.weight_decay, t.schedule = 1e-3, 5e-4, "fixmatch_cosine"
    t.batch_size, t.eval_batch_size = 128, 256
    c.ssl.mu = 7
    c.ssl.methods = ALL_METHODS
    return c
