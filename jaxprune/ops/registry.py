"""Choosing a convolution implementation by name, for ``nn.Conv(conv_general_dilated=...)``."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import jax
from jax import lax

from jaxprune.ops.conv import conv_general_dilated_gemm

ConvFn = Callable[..., jax.Array]

# name -> a function with the signature of `jax.lax.conv_general_dilated`.
CONV_IMPLS: Mapping[str, ConvFn] = types.MappingProxyType(
    {
        "xla": lax.conv_general_dilated,  # stock: XLA's convolutions for all three passes
        "gemm": conv_general_dilated_gemm,  # weight gradient as shifted matrix products
    }
)

# What "auto" picks per platform. On the 2-core x86 CPU used here (jaxlib 0.10.2, batch 128) the
# GEMM weight gradient removes XLA's slow layout transposes but copies the input once per
# kernel offset: it was faster only with the tuned malloc and idle cores (ResNet-20 ~0.85x,
# VGG-small ~0.93x of the stock step) and slower by 1.03-1.33x with the default malloc or a
# loaded machine (experiments/bench/train_step.py); as one im2col product, 0.98x (ResNet-20)
# and 1.10x (VGG-small) on an idle machine (experiments/bench/run_all.py). Not reliably
# faster, so every platform keeps the stock convolution.
_AUTO: Mapping[str, str] = types.MappingProxyType({"cpu": "xla", "gpu": "xla", "tpu": "xla"})


def default_conv_impl(platform: str | None = None) -> str:
    """Returns the implementation name that ``conv_impl("auto")`` uses on a platform.

    Args:
      platform: ``"cpu"``, ``"gpu"``, ``"tpu"`` (or ``"cuda"``/``"rocm"``, read as gpu);
        defaults to `jax.default_backend()`.

    Returns:
      A key of `CONV_IMPLS`; ``"xla"`` for platforms not measured.
    """
    platform = (platform or jax.default_backend()).lower()
    if platform in ("cuda", "rocm"):
        platform = "gpu"
    return _AUTO.get(platform, "xla")


def conv_impl(name: str = "auto", *, platform: str | None = None) -> ConvFn:
    """Returns the convolution function to pass to flax's ``nn.Conv(conv_general_dilated=...)``.

    Args:
      name: ``"xla"`` (stock `jax.lax.conv_general_dilated`), ``"gemm"``
        (`conv_general_dilated_gemm`), or ``"auto"``: the faster one measured for the
        platform (`default_conv_impl`).
      platform: the platform ``"auto"`` chooses for; defaults to `jax.default_backend()`.

    Returns:
      A function with the signature of `jax.lax.conv_general_dilated`.

    Raises:
      ValueError: an unknown name.

    Example:
      >>> import flax.linen as nn
      >>> layer = nn.Conv(8, (3, 3), conv_general_dilated=conv_impl("gemm"))
    """
    if not isinstance(name, str) or (name != "auto" and name not in CONV_IMPLS):
        raise ValueError(
            f"unknown conv implementation {name!r}; use 'auto' or one of: {', '.join(CONV_IMPLS)}."
        )
    if name == "auto":
        name = default_conv_impl(platform)
    return CONV_IMPLS[name]
