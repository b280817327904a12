"""A faster XLA:CPU lowering for convolutions that read a single input channel.

XLA:CPU's convolution is slow when the input has one channel (grey images: the first layer of
LeNet-5 and VGG-small). LeNet-5's first layer (1 -> 6 channels, 5x5, 28x28, batch 128) took
3.9 ms, 6x PyTorch's 0.6 ms and 70% of the whole network's inference. Written as a sum of
``KH * KW`` shifted copies of the input, each times one row of the kernel, the same layer is one
fused elementwise loop: 0.55 ms (``experiments/bench/run_all.py`` has the network's rows).

The model's program keeps its ``conv_general_dilated``: only its CPU lowering changes, so the
channel graph, gates, criteria and autodiff see the usual convolution (its gradients are other
convolutions, lowered as before). `use_single_channel_lowering` installs the rule for the CPU
platform; anything it does not handle goes to the lowering that was there before.

Handled: NHWC input with one channel, HWIO kernel, NHWC output, unit strides, no dilation, one
feature group and one batch group, floating point operands of one dtype, at most
`MAX_TAPS` kernel positions. The sum is accumulated in the operands' dtype, position by
position, so results differ from XLA's convolution by float rounding only.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
from jax.interpreters import mlir

# Kernel positions up to which the shifted sum is used (7x7 at most; the loop is unrolled).
MAX_TAPS = 49
_NHWC_HWIO = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)
_installed: dict[str, Any] = {}


def handles(lhs: Any, rhs: Any, **params: Any) -> bool:
    """Whether the single-channel lowering applies to a ``conv_general_dilated`` equation.

    Args:
      lhs: the input's abstract value (shape and dtype).
      rhs: the kernel's abstract value.
      **params: the equation's parameters.

    Returns:
      True for the cases the module docstring lists.
    """
    if len(lhs.shape) != 4 or len(rhs.shape) != 4 or lhs.dtype != rhs.dtype:
        return False
    if not jax.numpy.issubdtype(lhs.dtype, jax.numpy.floating):
        return False
    if params.get("dimension_numbers") != _NHWC_HWIO or lhs.shape[3] != 1:
        return False
    preferred = params.get("preferred_element_type")
    if preferred is not None and jax.numpy.dtype(preferred) != lhs.dtype:
        return False
    if params.get("feature_group_count", 1) != 1 or params.get("batch_group_count", 1) != 1:
        return False
    if tuple(params.get("window_strides", ())) != (1, 1):
        return False
    for key in ("lhs_dilation", "rhs_dilation"):
        if any(d != 1 for d in params.get(key) or ()):
            return False
    kh, kw = rhs.shape[:2]
    return kh * kw <= MAX_TAPS


def shifted_sum(lhs: jax.Array, rhs: jax.Array, padding: Any) -> jax.Array:
    """The convolution of a one-channel NHWC input with an HWIO kernel, as a shifted sum.

    Args:
      lhs: (N, H, W, 1).
      rhs: (KH, KW, 1, C_out).
      padding: one (low, high) pair per spatial axis (negative crops).

    Returns:
      (N, OH, OW, C_out), what ``lax.conv_general_dilated`` gives up to rounding.
    """
    (pt, pb), (pl, pr) = padding
    zero = lax.full((), 0, lhs.dtype)
    x = lax.pad(lhs, zero, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    kh, kw = rhs.shape[:2]
    n, height, width, _ = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    total = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(x, (0, i, j, 0), (n, i + out_h, j + out_w, 1))
            term = window * rhs[i, j, 0]
            total = term if total is None else total + term
    return total


def _rule(ctx: Any, lhs: Any, rhs: Any, **params: Any) -> Any:
    lhs_aval, rhs_aval = ctx.avals_in
    if handles(lhs_aval, rhs_aval, **params):
        padding = tuple(tuple(int(p) for p in pair) for pair in params["padding"])
        lowered = mlir.lower_fun(lambda a, b: shifted_sum(a, b, padding), multiple_results=False)
        return lowered(ctx, lhs, rhs)
    return _installed["previous"](ctx, lhs, rhs, **params)


def use_single_channel_lowering() -> bool:
    """Installs the single-channel lowering for ``conv_general_dilated`` on CPU (once).

    Returns:
      True when the rule is installed (now or before); False when this JAX does not expose the
      lowering it would fall back to, so nothing was changed.
    """
    if "previous" in _installed:
        return True
    previous = current_cpu_rule()
    if previous is None:
        return False
    _installed["previous"] = previous
    mlir.register_lowering(lax.conv_general_dilated_p, _rule, platform="cpu")
    return True


def current_cpu_rule() -> Any:
    """The CPU lowering rule of ``conv_general_dilated`` installed now (the one a new rule
    falls back to), or None when this JAX does not expose it."""
    try:
        from jax._src.interpreters import mlir as internal

        primitive = lax.conv_general_dilated_p
        entry = internal._platform_specific_lowerings["cpu"].get(primitive)
        return entry.rule if entry is not None else internal._lowerings[primitive].rule
    except (ImportError, AttributeError, KeyError):  # another JAX: keep its lowering
        return None
