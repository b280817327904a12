"""Names of pytree paths: ("params", "conv1", "kernel") from JAX's key objects."""

from __future__ import annotations

from typing import Any

import jax

Path = tuple[str, ...]


def key_name(key: Any) -> str:
    """The plain name of one entry of a pytree key path (dict key, index or attribute)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_of(keys: tuple[Any, ...]) -> Path:
    """A key path as a tuple of names."""
    return tuple(key_name(k) for k in keys)
