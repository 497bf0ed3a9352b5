"""BiasPruner on HAM10000 as a class-incremental sequence (mel / nv, then bcc / bkl, then
akiec / df / vasc), fairness by sex. HAM10000 has no reference bias split: the training data's
own correlations are the bias, and the lesion-wise test split is not rebalanced.

    jaxmed --config=configs/biaspruner/ham10000.py --workdir=W --config.data.root=/data/HAM10000

Runtime: 7 methods x 3 tasks x 40 epochs over ~7,000 training images at 224 px: a few hours on
one H100 (not measured: no real data here). Expected result: task-aware accuracy near the
fine-tuning baseline's with smaller sex gaps (EOdd); task-agnostic ACC limited by entropy task
selection across unrelated lesion groups.
"""

from jaxmed.config_check import sibling


def get_config(arg: str = ""):
    common = sibling(__file__)
    c = common.real_data_config("ham10000", "rrc(0.5)|flip|rotate(15)", epochs=20)
    cc = c.continual
    cc.tasks = ((4, 5), (1, 2), (0, 3, 6))  # HAM classes: akiec bcc bkl df mel nv vasc
    cc.sensitive_attr = "sex"
    if arg:
        raise ValueError(f"unknown variant {arg!r}")
    return c
