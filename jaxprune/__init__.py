"""jaxprune: remove whole kernels from convolutional networks in JAX/Flax, by pure functions."""

__version__ = "0.1.0"
