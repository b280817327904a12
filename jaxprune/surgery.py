"""Physical removal of channels: `prune(variables, graph, keep)` returns smaller trees.

Surgery is a pure function. Given the indices each channel group keeps, it slices every
parameter axis the group touches (producer kernels and biases, batch-norm scale, bias and
statistics, consumer kernels' input axes, the rows of a dense layer after a flatten) and, when
given, the optimizer state (momenta sliced alongside their parameters with
`optax.tree_map_params`; step counts untouched), then reads the new width spec back from the
pruned parameters so a zoo model can be rebuilt from it. Nothing passed in is modified.

Masks and keep indices are two views of one decision; `keep_to_masks` and `masks_to_keep`
convert between them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.graph import ChannelGraph, GraphError, Member
from jaxprune.models.widths import widths_from_params
from jaxprune.tree_paths import Path, path_of

KeepIndices = Mapping[str, Sequence[int] | np.ndarray | jax.Array]


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message names the problem and fix."""


@dataclasses.dataclass(frozen=True)
class Pruned:
    """The result of `prune`.

    Attributes:
      variables: the pruned variables (same structure, smaller arrays).
      opt_state: the pruned optimizer state, or None if none was given.
      widths: the width spec of the pruned parameters (`models.widths_from_params`).
      keep: the validated keep indices per group (sorted int arrays).
    """

    variables: Any
    opt_state: Any
    widths: dict[str, int]
    keep: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _AxisSlices:
    """What to keep along each axis of one array (a pytree leaf, not a node)."""

    positions: tuple[tuple[int, np.ndarray], ...]

    def apply(self, array: Any) -> Any:
        for axis, keep in self.positions:
            array = jnp.take(array, jnp.asarray(keep), axis=axis)
        return array


def validate_keep(graph: ChannelGraph, keep: KeepIndices) -> dict[str, np.ndarray]:
    """Checks keep indices against the graph and returns them as sorted int arrays.

    Raises:
      PruneError: an unknown or fixed group, an empty keep, indices out of range or repeated.
    """
    checked: dict[str, np.ndarray] = {}
    for name, indices in keep.items():
        try:
            group = graph[name]
        except GraphError as e:
            raise PruneError(str(e)) from None
        arr = np.asarray(indices)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise PruneError(
                f"keep[{name!r}] must be a 1-D array of channel indices, got shape {arr.shape} "
                f"and dtype {arr.dtype}. Convert a mask with masks_to_keep."
            )
        if arr.size == 0:
            raise PruneError(
                f"keep[{name!r}] is empty: removing every channel of {name!r} would disconnect "
                f"the network. Keep at least one of its {group.size} channels."
            )
        bad = arr[(arr < 0) | (arr >= group.size)]
        if bad.size:
            raise PruneError(
                f"keep[{name!r}] has indices {bad.tolist()} outside 0..{group.size - 1}: the "
                f"group has {group.size} channels."
            )
        unique = np.unique(arr)
        if unique.size != arr.size:
            repeated = sorted({int(i) for i in arr if np.sum(arr == i) > 1})
            raise PruneError(
                f"keep[{name!r}] repeats indices {repeated}; each channel can be kept once."
            )
        checked[name] = unique.astype(np.int64)
    return checked


def check_tree(graph: ChannelGraph, variables: Any) -> None:
    """Checks that `variables` is the tree the graph was built from (paths and shapes).

    Raises:
      PruneError: a leaf is missing, extra, or of another shape, with the paths named.
    """
    leaves = {path_of(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    expected = dict(graph.variable_shapes)
    missing = sorted(set(expected) - set(leaves))
    extra = sorted(set(leaves) - set(expected))
    wrong = sorted(p for p in set(leaves) & set(expected) if tuple(leaves[p]) != expected[p])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {['/'.join(p) for p in missing[:5]]}")
        if extra:
            parts.append(f"not in the graph {['/'.join(p) for p in extra[:5]]}")
        if wrong:
            parts.append(
                "shapes differ at "
                + ", ".join(f"{'/'.join(p)} {leaves[p]} vs {expected[p]}" for p in wrong[:5])
            )
        raise PruneError(
            "The variables do not match the channel graph: "
            + "; ".join(parts)
            + ". Build the graph from these variables (channel_graph(apply_fn, variables, x)), "
            "e.g. again after an earlier prune."
        )


def axis_slices(graph: ChannelGraph, keep: Mapping[str, np.ndarray]) -> dict[Path, _AxisSlices]:
    """For every variable path that changes, the positions kept along each of its axes."""
    by_path: dict[Path, dict[int, np.ndarray]] = {}
    for name, indices in keep.items():
        for member in graph[name].members:
            _intersect(by_path.setdefault(member.path, {}), member, indices, graph)
    return {
        path: _AxisSlices(tuple(sorted(axes.items(), key=lambda kv: kv[0])))
        for path, axes in by_path.items()
    }


def _intersect(
    axes: dict[int, np.ndarray], member: Member, indices: np.ndarray, graph: ChannelGraph
) -> None:
    """Two groups slicing one axis (a dense layer after a concatenation) keep the
    intersection of what each keeps."""
    size = graph.variable_shapes[member.path][member.axis]
    positions = member.keep_positions(indices)
    if member.axis in axes:
        positions = np.intersect1d(axes[member.axis], positions)
    elif positions.size == size:
        return
    axes[member.axis] = positions


def prune(
    variables: Any,
    graph: ChannelGraph,
    keep: KeepIndices,
    *,
    opt_state: Any = None,
    optimizer: optax.GradientTransformation | None = None,
) -> Pruned:
    """Removes channels physically: every dependent parameter, statistic and momentum.

    Args:
      variables: the model variables the graph was built from, e.g.
        ``{"params": ..., "batch_stats": ...}``.
      graph: their channel graph.
      keep: per group name, the indices of the channels to keep; groups left out keep all.
      opt_state: optionally, the optimizer state of ``variables["params"]``; its parameter-shaped
        leaves (momenta, second moments) are sliced like the parameters, so fine-tuning goes on
        with the same momentum for the surviving channels.
      optimizer: the optax transformation that made `opt_state` (needed to find its
        parameter-shaped parts).

    Returns:
      A `Pruned` with the smaller variables and optimizer state and the new width spec.

    Raises:
      PruneError: bad keep indices, or variables that do not match the graph.

    Example:
      >>> graph = channel_graph(model.apply, variables, x)
      >>> pruned = prune(variables, graph, {"conv1": [0, 2, 5]})
      >>> small = build_model("lenet5", 10, pruned.widths)
      >>> small.apply(pruned.variables, x)
    """
    checked = validate_keep(graph, keep)
    check_tree(graph, variables)
    slices = axis_slices(graph, checked)

    def slice_leaf(key_path, leaf):
        s = slices.get(path_of(key_path))
        return s.apply(leaf) if s is not None else leaf

    new_variables = jax.tree_util.tree_map_with_path(slice_leaf, variables)
    new_opt_state = None
    if opt_state is not None:
        new_opt_state = prune_opt_state(opt_state, optimizer, variables, slices)
    params = new_variables["params"] if "params" in new_variables else new_variables
    return Pruned(new_variables, new_opt_state, widths_from_params(params), checked)


def prune_opt_state(
    opt_state: Any,
    optimizer: optax.GradientTransformation | None,
    variables: Any,
    slices: Mapping[Path, _AxisSlices],
) -> Any:
    """Slices the parameter-shaped leaves of an optax state like the parameters."""
    if optimizer is None:
        raise PruneError(
            "Pruning an optimizer state needs the optax transformation that made it: "
            "pass optimizer=tx (the parameter-shaped parts of the state are found through it)."
        )
    params = variables["params"] if "params" in variables else variables
    prefix = ("params",) if "params" in variables else ()
    specs = jax.tree_util.tree_map_with_path(
        lambda p, leaf: slices.get(prefix + path_of(p), _AxisSlices(())), params
    )

    def slice_param_like(leaf, spec):
        # Some states keep placeholders (optax.MaskedNode) where a parameter is frozen.
        if not hasattr(leaf, "shape"):
            return leaf
        return spec.apply(leaf)

    try:
        return optax.tree_map_params(optimizer, slice_param_like, opt_state, specs)
    except Exception as e:  # report the optimizer mismatch, not optax internals
        raise PruneError(
            f"Could not match the optimizer state to the parameters ({type(e).__name__}: {e}). "
            "Pass the optimizer that created opt_state, or re-initialise it with "
            "optimizer.init(pruned.variables['params'])."
        ) from e


def keep_to_masks(graph: ChannelGraph, keep: KeepIndices) -> dict[str, jax.Array]:
    """Masks (1 kept, 0 removed) for every group; groups left out of `keep` are all ones."""
    checked = validate_keep(graph, keep)
    masks = {}
    for group in graph.groups:
        mask = np.ones(group.size, np.float32)
        if group.name in checked:
            mask[:] = 0
            mask[checked[group.name]] = 1
        masks[group.name] = jnp.asarray(mask)
    return masks


def masks_to_keep(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Keep indices from masks: the channels whose mask is non-zero."""
    return {name: np.nonzero(np.asarray(m))[0] for name, m in masks.items()}


def compose_keep(
    first: Mapping[str, np.ndarray], second: Mapping[str, Sequence[int] | np.ndarray]
) -> dict[str, np.ndarray]:
    """The keep that equals pruning with `first`, then with `second` (indices into the result
    of the first pruning). Groups are named as in the original graph."""
    composed = {name: np.asarray(idx) for name, idx in first.items()}
    for name, idx in second.items():
        base = composed.get(name)
        composed[name] = np.asarray(idx) if base is None else base[np.asarray(idx)]
    return composed
