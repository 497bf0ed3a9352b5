"""Shared by the BiasPruner configs: the paper's real-data setting and the reference splits.

Configs load this file by path (`load()` in each), so they work from any working directory."""

from jaxmed.methods import biaspruner

SPLITS = "../shared/splits/biaspruner"  # the reference's biased-train / unbiased-test splits


def real_data_config(dataset: str, augment: str, epochs: int):
    """ImageNet-stem ResNet-18 at 224 px, Adam 1e-4, batch 32, every method compared."""
    return biaspruner.real_data_config(dataset, augment, epochs)


def reference_splits(folder: str, *names: str) -> tuple[str, ...]:
    """The reference's split files, one per task (e.g. the biased split, then the flipped)."""
    return tuple(f"{SPLITS}/{folder}/{n}" for n in names)
