"""jaxmed: fast, composable JAX/Flax medical image classification research methods."""

__version__ = "0.1.0"
