"""A constructed set for HTL identification (`identify.identify_samples`): 1x4 grayscale
images whose pixels are the features of a linear classifier with planted weights (as
tests/test_htl_identify.py): pruning the weakest weights flips exactly the PLANTED samples'
top-1 at a majority of levels."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxmed.data import augment

SPARSITIES = (0.3, 0.5, 0.6)
W = np.array([[2.9, -3.0], [-3.1, 3.2], [-0.05, 0.05], [0.04, -0.04]], np.float32)
PLANTED = [3, 17, 28, 33]
N = 40


class PixelLinear(nn.Module):
    """Undoes the pipeline's normalization, so pixel / 255 are the features."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        mean = jnp.asarray(augment.IMAGENET_MEAN, jnp.float32).mean()
        std = jnp.asarray(augment.IMAGENET_STD, jnp.float32).mean()
        feats = (x * std + mean).reshape(x.shape[0], -1)
        return nn.Dense(2, use_bias=False, name="fc")(feats)


def planted_images():
    rng = np.random.default_rng(0)
    f = np.zeros((N, 4))
    y = rng.integers(0, 2, N)
    f[np.arange(N), y] = rng.uniform(0.5, 1.0, N)
    f[:, 2:] = rng.uniform(0, 0.3, (N, 2))
    f[PLANTED] = [3 / 255, 0.0, 1.0, 0.0]  # only the weak cue (row 2) says class 1
    images = np.round(f * 255).astype(np.uint8).reshape(N, 1, 4, 1)
    return images, y


def params():
    return {"fc": {"kernel": jnp.asarray(W)}}
