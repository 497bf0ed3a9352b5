"""Adapters for the official downloads of real datasets; importing registers them.

    ham10000, isic2018, isic2018_seg, isic2019, isic2020, fitzpatrick17k (skin.py)
    nih_cxr14 (+ BiasPruner GbP splits), nih_cxr_lt, mimic_cxr_lt (chest.py)
    synthetic_bias (jaxmed/data/synthetic_bias.py: a biased continual sequence)
    kvasir_capsule (kvasir_capsule.py: Kvasir-Capsule labelled_images + metadata.csv)
    hyper_kvasir (hyper_kvasir.py: Hyper-Kvasir labeled-images + image-labels.csv)
    medmnist (medmnist.py), tfds (jaxmed.data.tfds: ArrayRecord written by our builders)
"""

from jaxmed.data.datasets import chest, hyper_kvasir, medmnist, skin  # noqa: F401
from jaxmed.data.datasets import kvasir_capsule  # noqa: F401
from jaxmed.data import synthetic_bias  # noqa: F401  (config.data.name='synthetic_bias')

try:  # the `tfds` dataset needs tensorflow-datasets (pip install 'jaxmed[tfds]')
    import jaxmed.data.tfds  # noqa: F401
except ImportError as _missing:
    from jaxmed.data import register

    @register("tfds")
    def _tfds_unavailable(cfg, _error=str(_missing)):
        raise ImportError(f"config.data.name='tfds' needs tensorflow-datasets: pip install "
                          f"'jaxmed[tfds]' ({_error})")
