"""Physical removal of channels: `prune(variables, graph, keep)` returns a smaller model.

Surgery is a pure function. Given the indices each channel group keeps, it slices every
parameter axis the group touches (producer kernels and biases, batch-norm scale, bias and
statistics, consumer kernels' input axes, the rows of a dense layer after a flatten) and, when
given, the optimizer state (momenta sliced alongside their parameters with
`optax.tree_map_params`; step counts untouched). The result carries the pruned program
(`Pruned.apply_fn`), which runs the smaller model with the original calling convention and no
module, and by default is checked once against the masked model. Nothing passed in is modified.

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

# _MaskedInterpreter: gated_call without its retrace, for the self-check (same layer).
from jaxprune.gates import _MaskedInterpreter, gated_call, program_args
from jaxprune.graph import ChannelGraph, GraphError, Member
from jaxprune.program import PrunedProgram
from jaxprune.tree_paths import Path, path_of
from jaxprune.widths import widths_from_params

KeepIndices = Mapping[str, Sequence[int] | np.ndarray | jax.Array]


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message names the problem and fix."""


@dataclasses.dataclass(frozen=True)
class Pruned:
    """The result of `prune`.

    Attributes:
      variables: the pruned variables (same structure, smaller arrays).
      opt_state: the pruned optimizer state, or None if none was given.
      widths: the width spec of the pruned parameters (`widths_from_params`).
      keep: the validated keep indices per group (sorted int arrays).
      apply_fn: the pruned program, ``apply_fn(variables, x, **kwargs)`` with the original's
        calling convention (see `program.PrunedProgram`); None when built without a graph.
    """

    variables: Any
    opt_state: Any
    widths: dict[str, int]
    keep: dict[str, np.ndarray]
    apply_fn: PrunedProgram | None = None


@dataclasses.dataclass(frozen=True)
class _AxisSlices:
    """What to keep along each axis of one array (a pytree leaf, not a node)."""

    positions: tuple[tuple[int, np.ndarray], ...]

    def apply(self, array: Any) -> Any:
        host = _on_host(array)
        if host is not None:
            return jax.device_put(self.take_host(host))
        for axis, keep in self.positions:
            array = jnp.take(array, jnp.asarray(keep), axis=axis)
        return array

    def take_host(self, array: np.ndarray) -> np.ndarray:
        for axis, keep in self.positions:
            array = np.take(array, keep, axis=axis)
        return array


def _on_host(array: Any) -> np.ndarray | None:
    """The array as a NumPy view when it lives in host memory and slicing it there gives what
    `jnp.take` gives (a NumPy array, or an uncommitted single-device CPU array); else None.

    Slicing on the host avoids compiling one gather per distinct leaf shape (over a second for
    the first prune of a ResNet-56) and one dispatch per leaf.
    """
    if isinstance(array, np.ndarray):
        return array
    if not isinstance(array, jax.Array) or isinstance(array, jax.core.Tracer):
        return None
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.extended) or array.committed:
        return None
    devices = array.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    return np.asarray(array)


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
        if group.block > 1:
            blocks = np.unique(unique // group.block)
            whole = (blocks[:, None] * group.block + np.arange(group.block)).reshape(-1)
            if not np.array_equal(whole, unique):
                raise PruneError(
                    f"Group {name!r} is normalised in blocks of {group.block} channels "
                    f"(GroupNorm), so it is pruned in whole blocks, and keep[{name!r}] splits "
                    "some. Round it with jaxprune.round_keep_to_blocks(graph, keep)."
                )
        checked[name] = unique.astype(np.int64)
    return checked


def round_keep_to_blocks(
    graph: ChannelGraph, keep: KeepIndices, scores: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Rounds keep indices to whole blocks for groups pruned in blocks (GroupNorm).

    A block is kept when at least half of its channels are (ties kept), unless `scores` are
    given: then the blocks with the highest summed scores are kept, as many as the rounded count.
    Groups with ``block == 1`` are returned unchanged.

    Args:
      graph: the channel graph.
      keep: per group, the channel indices to keep.
      scores: optionally, per group, one score per channel (higher = more relevant).

    Returns:
      Keep indices that `prune` accepts.
    """
    rounded = {}
    for name, indices in keep.items():
        group = graph[name]
        arr = np.asarray(indices, dtype=np.int64)
        if group.block == 1:
            rounded[name] = arr
            continue
        n_blocks = group.size // group.block
        counts = np.bincount(arr // group.block, minlength=n_blocks)
        by_majority = np.nonzero(2 * counts >= group.block)[0]
        if by_majority.size == 0:
            by_majority = np.array([int(np.argmax(counts))])
        if scores is not None and name in scores:
            block_scores = np.asarray(scores[name], dtype=np.float64).reshape(n_blocks, -1).sum(1)
            order = np.argsort(-block_scores, kind="stable")
            blocks = np.sort(order[: by_majority.size])
        else:
            blocks = by_majority
        rounded[name] = (blocks[:, None] * group.block + np.arange(group.block)).reshape(-1)
    return rounded


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
    verify: bool = True,
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
      verify: run the masked model and the pruned program once on a random input of the
        graph's example shape and raise if they differ (two forward passes). Skipped when the
        variables are traced (inside `jax.jit` or `jax.eval_shape`).

    Returns:
      A `Pruned` with the smaller variables and optimizer state, the pruned program
      (`apply_fn`) and the new width spec.

    Raises:
      PruneError: bad keep indices, variables that do not match the graph, or (verify) a
        pruned program that disagrees with the masked model.

    Example:
      >>> graph = channel_graph(model.apply, variables, x)
      >>> pruned = prune(variables, graph, {"conv1": [0, 2, 5]})
      >>> logits = pruned.apply_fn(pruned.variables, x)
    """
    checked = validate_keep(graph, keep)
    check_tree(graph, variables)
    slices = axis_slices(graph, checked)

    new_variables = _slice_variables(variables, slices)
    new_opt_state = None
    if opt_state is not None:
        new_opt_state = prune_opt_state(opt_state, optimizer, variables, slices)
    params = new_variables["params"] if "params" in new_variables else new_variables
    program = pruned_program(graph, checked)
    result = Pruned(new_variables, new_opt_state, widths_from_params(params), checked, program)
    concrete = not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(variables))
    if verify and concrete and graph.apply_fn is not None:
        check_against_masks(graph, variables, result)
    return result


def _slice_variables(variables: Any, slices: Mapping[Path, _AxisSlices]) -> Any:
    """Every leaf sliced by its `_AxisSlices`; host leaves in NumPy, moved back in one
    transfer."""
    flat, tree = jax.tree_util.tree_flatten_with_path(variables)
    leaves = [leaf for _, leaf in flat]
    host_index, host_arrays = [], []
    for k, (key_path, leaf) in enumerate(flat):
        spec = slices.get(path_of(key_path))
        if spec is None:
            continue
        host = _on_host(leaf)
        if host is None:
            leaves[k] = spec.apply(leaf)
        else:
            host_index.append(k)
            host_arrays.append(spec.take_host(host))
    for k, array in zip(host_index, jax.device_put(host_arrays), strict=True):
        leaves[k] = array
    return jax.tree_util.tree_unflatten(tree, leaves)


def pruned_program(graph: ChannelGraph, keep: Mapping[str, np.ndarray]) -> PrunedProgram:
    """The pruned program for `keep`; a graph of an already pruned program is pruned from the
    original, with the keeps composed, so programs do not nest."""
    base = graph.apply_fn
    if isinstance(base, PrunedProgram):
        return PrunedProgram(base.graph, compose_keep(base.keep, keep))
    return PrunedProgram(graph, keep)


def probe_input(graph: ChannelGraph, seed: int = 0) -> np.ndarray:
    """A random input of the graph's example shape (zeros for integer inputs)."""
    struct = graph.program.input_struct
    if not np.issubdtype(np.dtype(struct.dtype), np.floating):
        return np.zeros(struct.shape, struct.dtype)
    rng = np.random.default_rng(seed)
    return rng.standard_normal(struct.shape).astype(struct.dtype)


def check_against_masks(graph: ChannelGraph, variables: Any, pruned: Pruned) -> None:
    """Raises `PruneError` unless the pruned program equals the masked model on a probe input.

    Only the model's own outputs are compared (updated statistics, when the graph was traced
    with ``mutable=``, have the pruned shapes).
    """
    x = probe_input(graph)
    kwargs = dict(graph.call_kwargs)
    masks = keep_to_masks(graph, pruned.keep)
    masked = _masked_probe(graph, variables, x, masks, kwargs)
    # Run once op by op: compiling the pruned program for one probe costs several times more.
    evaluate = getattr(pruned.apply_fn, "evaluate", pruned.apply_fn)
    small = evaluate(pruned.variables, x, **kwargs)
    skip = [k for k, s in enumerate(graph.program.state_output_paths) if s is not None]
    difference = first_difference(masked, small, skip=skip)
    if difference is not None:
        raise PruneError(
            f"The pruned program differs from the masked model on a probe input ({difference}). "
            "The model does something to these channels that jaxprune does not resize "
            "correctly; please report it with the model. Pass verify=False to get the result "
            "anyway."
        )


def _masked_probe(
    graph: ChannelGraph, variables: Any, x: np.ndarray, masks: Any, kwargs: Mapping[str, Any]
) -> Any:
    """`gated_call` on the probe input, reusing the graph's own trace when the variables have
    the traced shapes and dtypes (the probe has the traced input's): retracing the model
    would give the same program, and tracing costs more than the masked run itself."""
    structs = jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)), variables
    )
    if structs != graph.program.variables_struct:
        return gated_call(graph.apply_fn, graph, variables, x, masks, **kwargs)
    points = {g.name: graph.gate_points[g.name] for g in graph.groups}
    interpreter = _MaskedInterpreter(graph, points, masks, {}, False)
    outs = interpreter.run(program_args(variables, x, kwargs))
    return jax.tree_util.tree_unflatten(graph.program.output_tree, outs)


def first_difference(expected: Any, actual: Any, *, skip: Sequence[int] = ()) -> str | None:
    """Where two model outputs differ beyond float tolerance (None if nowhere).

    The tolerance is relative to the largest expected magnitude: 1e-4 for float32, more for
    lower precisions. Leaves listed in `skip` (by position) are not compared.
    """
    ours = jax.tree_util.tree_leaves(expected)
    theirs = jax.tree_util.tree_leaves(actual)
    if len(ours) != len(theirs):
        return f"{len(theirs)} output arrays instead of {len(ours)}"
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if k in skip:
            continue
        dtype = np.asarray(b).dtype
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return f"output {k} has shape {b.shape} instead of {a.shape}"
        eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else 0.0
        tol = max(1e-4, 16 * eps) * max(1.0, float(np.nanmax(np.abs(a), initial=0.0)))
        diff = float(np.nanmax(np.abs(a - b), initial=0.0))
        if np.any(np.isnan(a) != np.isnan(b)) or diff > tol:
            return f"output {k}: max difference {diff:.3g}, tolerance {tol:.3g}"
    return None


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
