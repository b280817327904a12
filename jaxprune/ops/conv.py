"""A drop-in `conv_general_dilated` whose weight gradient is computed as matrix products.

For an NHWC input ``x`` and an HWIO kernel ``w`` with strides ``(sh, sw)``, the weight gradient
of ``y = conv(x, w)`` is, for every kernel offset ``(kh, kw)``::

    dW[kh, kw] = X(kh, kw)^T @ dY          # (C_in x N*OH*OW) @ (N*OH*OW x C_out)

where ``X(kh, kw)`` holds, for every output position, the padded input pixel that the offset
reads (``x_pad[n, kh + sh * i, kw + sw * j, :]``) and ``dY`` is the output gradient with its
positions flattened. `conv_general_dilated_gemm` computes the forward pass and the input
gradient with XLA's own convolutions and the weight gradient with these ``KH * KW`` products,
stacked into one matrix product over an im2col of the input. The input is transposed once to
channel-major order, so the product reads its operands in the layout CPU matrix kernels are
fastest with.

Anything else (other layouts, dilation, feature or batch groups, a different output dtype,
mixed operand dtypes, ranks other than 2 spatial dims) goes to `jax.lax.conv_general_dilated`
unchanged, so the function is always correct.

Performance (2-core x86 CPU, jaxlib 0.10.2, batch 128): XLA's weight-gradient convolution
first moves the batch axis of x and dY to the innermost position, and those transposes (fused
with the BatchNorm/ReLU chains that produce x and dY) were about 45% of a ResNet-20 step. The
products here need no such transpose, but they copy the padded input once per kernel offset.
With the tuned malloc of `jaxprune.ops.cpu` and idle cores that was a net gain (ResNet-20 about
0.85x, VGG-small about 0.93x of the stock step); with the default malloc or a loaded machine a
loss (1.03-1.33x). In the one-command benchmark (``python -m experiments.bench``, idle CPU,
tuned malloc) the single im2col product gave ResNet-20 0.98x and VGG-small 1.10x of the stock
step: alone, XLA's weight-gradient convolution is faster than the product (90 against 105 ms
over VGG-small's six convolutions, ``experiments/bench/conv_profile.py``), and the step is
convolution-bound. `jaxprune.ops.conv_impl("auto")` therefore keeps the stock op.

Limitation: the custom rule is a `jax.custom_vjp`, so forward-mode differentiation
(`jax.jvp`, `jax.jacfwd`, Hessian-vector products) of the handled case raises; use
``conv_impl("xla")`` for code that needs it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# The only layout handled: flax's default for 2-D convolutions (NHWC input, HWIO kernel).
_NHWC_HWIO = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)

Pads = tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
    """Static description of one handled convolution (hashable: a custom_vjp static arg)."""

    strides: tuple[int, int]
    padding: Pads
    precision: Any


def _forward(x: jax.Array, w: jax.Array, spec: _ConvSpec) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, spec.strides, spec.padding, dimension_numbers=_NHWC_HWIO, precision=spec.precision
    )


def _leftover(size: int, pads: tuple[int, int], kernel: int, stride: int) -> int:
    """Input rows (or columns) after the last window, which the convolution never reads."""
    return (size + pads[0] + pads[1] - kernel) % stride


def _input_grad(
    dy: jax.Array, w: jax.Array, x_shape: tuple[int, ...], spec: _ConvSpec
) -> jax.Array:
    """dL/dx: the transposed convolution, i.e. dY dilated by the strides, convolved with the
    spatially flipped kernel whose in/out features are swapped."""
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = spec.padding
    rest_h = _leftover(x_shape[1], (pt, pb), kh, spec.strides[0])
    rest_w = _leftover(x_shape[2], (pl, pr), kw, spec.strides[1])
    flipped = jnp.flip(w, (0, 1)).swapaxes(2, 3)
    # Padding may be negative (it crops); the trailing `rest` rows get zero gradient.
    pads = ((kh - 1 - pt, kh - 1 - pb + rest_h), (kw - 1 - pl, kw - 1 - pr + rest_w))
    return lax.conv_general_dilated(
        dy,
        flipped,
        (1, 1),
        pads,
        lhs_dilation=spec.strides,
        dimension_numbers=_NHWC_HWIO,
        precision=spec.precision,
    )


def _channel_major(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (C, N, H, W), written as one 2-D transpose of (N*H*W, C)."""
    n, h, w, c = x.shape
    return x.reshape(n * h * w, c).T.reshape(c, n, h, w)


def _weight_grad(
    x_cmajor: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], spec: _ConvSpec
) -> jax.Array:
    """dL/dW as one (KH*KW*C_in x P) @ (P x C_out) product over a channel-major im2col.

    P = N * OH * OW. Row ``(kh * KW + kw) * C_in + c`` of the im2col holds input channel c as
    read by kernel offset (kh, kw) at every output position, so the product's rows come out in
    the HWIO order of the kernel and one reshape gives dW. One large product instead of KH*KW
    small ones: in the train step, under load, ResNet-20 took 0.78x of the stock step (0.94x
    with one product per offset), VGG-small 1.10x (1.18x); alone, with the tuned malloc, the
    two forms cost about the same and both more than XLA's own weight-gradient convolution.
    """
    kh_size, kw_size, c_in, c_out = kernel_shape
    _, out_h, out_w, _ = dy.shape
    sh, sw = spec.strides
    (pt, pb), (pl, pr) = spec.padding
    zero = jnp.zeros((), x_cmajor.dtype)
    # lax.pad, unlike jnp.pad, accepts negative padding (a crop), as the convolution does.
    padded = lax.pad(x_cmajor, zero, ((0, 0, 0), (0, 0, 0), (pt, pb, 0), (pl, pr, 0)))
    taps = [
        lax.slice(
            padded,
            (0, 0, kh, kw),
            (c_in, padded.shape[1], kh + sh * (out_h - 1) + 1, kw + sw * (out_w - 1) + 1),
            (1, 1, sh, sw),
        ).reshape(c_in, -1)
        for kh in range(kh_size)
        for kw in range(kw_size)
    ]
    columns = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=0)
    # Accumulate low-precision inputs in float32, like XLA's convolution does.
    acc_type = jnp.promote_types(dy.dtype, jnp.float32)
    grad = lax.dot(
        columns,
        dy.reshape(-1, c_out),
        precision=spec.precision,
        preferred_element_type=acc_type,
    )
    return grad.reshape(kernel_shape).astype(dy.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_nhwc(x: jax.Array, w: jax.Array, spec: _ConvSpec) -> jax.Array:
    return _forward(x, w, spec)


def _conv_nhwc_fwd(
    x: jax.Array, w: jax.Array, spec: _ConvSpec
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    # Keep the input channel-major: the transpose then happens in the forward pass, where XLA
    # can schedule it next to the producer of x, and the backward pass reads it as is.
    return _forward(x, w, spec), (_channel_major(x), w)


def _conv_nhwc_bwd(
    spec: _ConvSpec, residuals: tuple[jax.Array, jax.Array], dy: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x_cmajor, w = residuals
    c, n, h, wd = x_cmajor.shape
    dx = _input_grad(dy, w, (n, h, wd, c), spec)
    dw = _weight_grad(x_cmajor, dy, w.shape, spec)
    return dx, dw


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def _explicit_padding(
    padding: str | Sequence[tuple[int, int]], x: jax.Array, w: jax.Array, strides: tuple[int, ...]
) -> Pads | None:
    """Padding as two (low, high) int pairs, or None when it is not a form handled here."""
    if isinstance(padding, str):
        try:
            pairs = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
        except (TypeError, ValueError):
            return None
    else:
        pairs = padding
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in pairs)
    except (TypeError, ValueError):
        return None
    return pads if len(pads) == 2 else None  # type: ignore[return-value]


def _handled_spec(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
    precision: Any,
    preferred_element_type: Any,
) -> _ConvSpec | None:
    """The static spec of a convolution this module handles, or None to use the stock op."""
    if getattr(lhs, "ndim", None) != 4 or getattr(rhs, "ndim", None) != 4:
        return None
    if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
        return None
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != lhs.dtype:
        return None
    if feature_group_count != 1 or batch_group_count != 1:
        return None
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        return None
    try:
        numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return None
    if numbers != _NHWC_HWIO:
        return None
    strides = tuple(int(s) for s in window_strides)
    if len(strides) != 2 or min(strides) < 1:
        return None
    pads = _explicit_padding(padding, lhs, rhs, strides)
    if pads is None:
        return None
    try:
        hash(precision)
    except TypeError:
        return None
    out_sizes = [
        (size + lo + hi - k) // s + 1
        for size, (lo, hi), k, s in zip(lhs.shape[1:3], pads, rhs.shape[:2], strides, strict=True)
    ]
    if min(out_sizes) < 1:
        return None  # An empty output: let the stock op produce (or refuse) it.
    return _ConvSpec(strides=strides, padding=pads, precision=precision)  # type: ignore[arg-type]


def conv_general_dilated_gemm(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` with a matrix-product weight gradient.

    Same signature and same results as `jax.lax.conv_general_dilated`; pass it to flax as
    ``nn.Conv(..., conv_general_dilated=conv_general_dilated_gemm)``. A 2-D convolution in
    the NHWC/HWIO layout, with any strides and any padding (``"SAME"``, ``"VALID"`` or
    explicit pairs), no dilation, one feature group and one batch group, gets the custom
    backward pass described in the module docstring; every other call is forwarded to the
    stock op.

    Args:
      lhs: the input, e.g. (N, H, W, C_in).
      rhs: the kernel, e.g. (KH, KW, C_in, C_out).
      window_strides: the strides of the spatial dimensions.
      padding: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"`` or one (low, high) pair per
        spatial dimension.
      lhs_dilation: input dilation (transposed convolutions); not 1 -> stock op.
      rhs_dilation: kernel (atrous) dilation; not 1 -> stock op.
      dimension_numbers: as for `jax.lax.conv_general_dilated`.
      feature_group_count: grouped/depthwise convolutions (not 1) go to the stock op.
      batch_group_count: not 1 -> stock op.
      precision: passed to every convolution and matrix product.
      preferred_element_type: output dtype; anything but the input dtype -> stock op.

    Returns:
      The convolution output, equal to the stock op's up to float rounding.

    Example:
      >>> import jax.numpy as jnp
      >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
      >>> dn = ("NHWC", "HWIO", "NHWC")
      >>> conv_general_dilated_gemm(x, w, (1, 1), "SAME", dimension_numbers=dn).shape
      (2, 8, 8, 4)
    """
    spec = _handled_spec(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
    if spec is None:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    return _conv_nhwc(lhs, rhs, spec)


def is_handled(
    lhs: Any,
    rhs: Any,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> bool:
    """Whether `conv_general_dilated_gemm` uses its own backward pass for these arguments.

    Takes the arguments of `conv_general_dilated_gemm` (arrays or `jax.ShapeDtypeStruct`s).

    Returns:
      True for the custom path, False when the call is forwarded to the stock op.
    """
    spec = _handled_spec(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
    return spec is not None
