"""The width spec of a params tree: output features of every layer with a kernel, by path.

A width spec is a flat mapping such as ``{"conv1": 6, "stage2/block0/conv1": 32, "head": 10}``.
The key of a layer is the path of the sub-dict that holds its ``"kernel"``, joined with ``"/"``;
the value is the kernel's last dimension. It works on any flax params tree (linen or an NNX
state as a pure dict).
"""

from __future__ import annotations

from typing import Any

import jax
from flax.core import meta

from jaxprune.tree_paths import key_name


def widths_from_params(params: Any) -> dict[str, int]:
    """Reads the width spec of any flax params tree.

    Every leaf named ``"kernel"`` is one layer; its key is the path of the module holding it,
    joined with ``"/"`` (the empty string for a bare layer initialised on its own), and its
    width is ``kernel.shape[-1]`` (output features of `nn.Conv` and `nn.Dense`).

    Args:
      params: the ``"params"`` collection of a flax model (``variables["params"]``, not the
        whole variables dict), as arrays or as `jax.ShapeDtypeStruct` from `jax.eval_shape`.
        Boxed metadata (e.g. `nn.Partitioned`) is unboxed first.

    Returns:
      A dict from layer path to its number of output features, in the tree's key order.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))["params"]
      >>> widths_from_params({"fc": params})
      {'fc': 3}
    """
    leaves = jax.tree_util.tree_leaves_with_path(meta.unbox(params))
    widths: dict[str, int] = {}
    for path, leaf in leaves:
        if not path or key_name(path[-1]) != "kernel":
            continue
        shape = getattr(leaf, "shape", None)
        if not shape:
            raise ValueError(
                f"kernel at {'/'.join(key_name(k) for k in path)!r} has no shape ({leaf!r}); "
                "pass a params tree of arrays or jax.ShapeDtypeStruct."
            )
        widths["/".join(key_name(k) for k in path[:-1])] = int(shape[-1])
    return widths
