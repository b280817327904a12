"""Faster building blocks for training convnets on a CPU, as drop-ins for the stock ones.

* `conv_impl` picks a convolution for ``flax.linen.Conv(conv_general_dilated=...)``:
  ``"xla"`` (stock), ``"gemm"`` (`conv_general_dilated_gemm`: the weight gradient as shifted
  matrix products) or ``"auto"`` (what was measured fastest on the platform).
* `max_pool` is `flax.linen.max_pool` with a reshape form for windows that tile the input,
  whose gradient is elementwise instead of an index-recording scatter.
* `GLIBC_TUNABLES` / `tuned_environ`: malloc settings for the process that stop XLA:CPU from
  page-faulting its temporaries at every step.
* `use_cpu_defaults`: XLA:CPU without YNNPACK fusions, measured faster for every convnet of the
  benchmark, and convolutions lowered to oneDNN where its library is built
  (`jaxprune.ops.onednn`). Importing this package applies it (before any JAX backend starts;
  opt out with ``JAXPRUNE_STOCK_XLA_CPU=1``, or of oneDNN alone with ``JAXPRUNE_ONEDNN=0``);
  see `jaxprune.ops.cpu`.

Example:
  >>> import flax.linen as nn
  >>> from jaxprune import ops
  >>> conv = nn.Conv(16, (3, 3), conv_general_dilated=ops.conv_impl("auto"))
"""

from jaxprune.ops.conv import conv_general_dilated_gemm, is_handled
from jaxprune.ops.cpu import (
    GLIBC_TUNABLES,
    OPT_OUT_ENV,
    cpu_compiler_options,
    has_tuned_malloc,
    stock_cpu_compiler_options,
    tuned_environ,
    use_cpu_defaults,
)
from jaxprune.ops.pool import max_pool
from jaxprune.ops.registry import CONV_IMPLS, ConvFn, conv_impl, default_conv_impl

__all__ = [
    "CONV_IMPLS",
    "GLIBC_TUNABLES",
    "OPT_OUT_ENV",
    "ConvFn",
    "conv_general_dilated_gemm",
    "conv_impl",
    "cpu_compiler_options",
    "default_conv_impl",
    "has_tuned_malloc",
    "is_handled",
    "max_pool",
    "stock_cpu_compiler_options",
    "tuned_environ",
    "use_cpu_defaults",
]

# The measured-fastest XLA:CPU configuration is the default (a no-op once a backend started).
use_cpu_defaults()
