"""Max pooling over non-overlapping windows as a reshape and a max, for a cheaper gradient.

`flax.linen.max_pool` lowers to a ``reduce_window``. Its gradient on XLA:CPU (JAX 0.10) records
the position of every window's maximum with integer index arrays the size of the input and
scatters into them, which writes several times the activation's memory. When the windows tile
the input (stride = window, no padding), the same pooling is a reshape that splits each spatial
axis into (outer, window) followed by a max over the window axes; its gradient is an
elementwise comparison with the maximum, which XLA fuses into neighbouring operations.

The forward values are identical. The gradients differ only where a window holds several
equal maxima: here they share the gradient equally, where the stock op gives it all to one of
them. After a ReLU, the usual tie (several zeros) gets zero gradient either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax.linen import pooling


def _tiles(
    window_shape: tuple[int, ...],
    strides: tuple[int, ...] | None,
    padding: str | Sequence[tuple[int, int]],
    spatial: tuple[int, ...],
) -> bool:
    """Whether the windows tile the input exactly, so the reshape form is exact."""
    if strides is None or tuple(strides) != tuple(window_shape):
        return False
    # Only exact tilings: cropping the rest would need a `slice`, which the channel-graph
    # analysis does not follow, so such shapes keep the stock op.
    if any(n % k for n, k in zip(spatial, window_shape, strict=True)):
        return False
    if isinstance(padding, str):
        return padding in ("VALID", "SAME")  # Both add nothing when the windows tile.
    try:
        return all(tuple(pair) == (0, 0) for pair in padding)
    except TypeError:
        return False


def max_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """Drop-in for `flax.linen.max_pool`, with a fast path for non-overlapping windows.

    Args:
      inputs: ``(batch..., spatial..., features)``, one spatial axis per window dimension
        (a missing batch axis is allowed, as in flax).
      window_shape: the window size along each spatial axis, e.g. ``(2, 2)``.
      strides: the step between windows; ``None`` means 1 (flax's default), which overlaps.
      padding: ``"VALID"``, ``"SAME"`` or explicit (low, high) pairs.

    Returns:
      The pooled array, equal to ``flax.linen.max_pool(inputs, window_shape, strides,
      padding)``. Windows that tile the input exactly (``strides == window_shape``, every
      spatial size a multiple of its window, no padding) use the reshape form; anything else
      calls flax.

    Raises:
      ValueError: `inputs` has fewer axes than ``len(window_shape) + 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> max_pool(jnp.ones((8, 7, 7, 16)), (2, 2), strides=(2, 2)).shape
      (8, 3, 3, 16)
    """
    window = tuple(int(k) for k in window_shape)
    ndim = len(window)
    if inputs.ndim < ndim + 1:
        raise ValueError(
            f"max_pool with a {ndim}-D window needs inputs of rank >= {ndim + 1} "
            f"(spatial axes then features), got shape {inputs.shape}."
        )
    spatial = inputs.shape[-ndim - 1 : -1]
    stride_tuple = None if strides is None else tuple(int(s) for s in strides)
    if min(window, default=1) < 1 or not _tiles(window, stride_tuple, padding, spatial):
        return pooling.max_pool(inputs, window, strides=strides, padding=padding)
    lead = inputs.shape[: -ndim - 1]
    split: list[int] = []
    for n, k in zip(spatial, window, strict=True):
        split += [n // k, k]
    blocks = inputs.reshape(*lead, *split, inputs.shape[-1])
    window_axes = tuple(len(lead) + 2 * i + 1 for i in range(ndim))
    return jnp.max(blocks, axis=window_axes)
