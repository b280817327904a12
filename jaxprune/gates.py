"""Run any model with per-channel gates, and read activations and their gradients, unchanged.

A gate multiplies a channel group's channels by a mask where their consumers read them (after
normalisation and the nonlinearity). Masking channel c there is exactly equivalent to removing
it (`surgery.prune`), which is a tested invariant. The model's own code is never touched: the
traced program is re-run by a small interpreter that multiplies the gate values on the way.

Masks are ordinary traced inputs, so:

* changing masks never recompiles (iterative pruning keeps one compiled step);
* `jax.vmap` over a stack of masks scores many candidate prunings in one call
  (`map_over_masks`, chunked with `jax.lax.map` to bound memory);
* adding a zero *probe* at each gate and differentiating with respect to it gives dL/da, the
  gradient with respect to the activation, without any weight gradient
  (`activations_and_gradients`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.graph import AxisRef, ChannelGraph, GatePoint, GraphError, analyse
from jaxprune.interpret import Interpreter, bind, frames_holding
from jaxprune.trace import TracedProgram, split_kwargs, trace_apply

Masks = Mapping[str, jax.Array]
# Per group, one array per gate point of that group (in `ChannelGraph.gate_points` order).
PointValues = Mapping[str, tuple[jax.Array, ...]]

_OPAQUE_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def gated_call(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    x: jax.Array,
    masks: Masks | None = None,
    *,
    probes: PointValues | None = None,
    capture: bool = False,
    **kwargs: Any,
) -> Any:
    """Calls `apply_fn(variables, x, **kwargs)` with the channels of each group gated.

    Args:
      apply_fn: the model function the graph was built from.
      graph: its channel graph (`graph.channel_graph`).
      variables: the model variables (the same widths as the graph).
      x: the input batch; any batch size.
      masks: per group name, a vector of `group.size` gate values (1 keeps, 0 removes); groups
        left out are not gated.
      probes: per group, one array per gate point, added to the gated value (zeros, to
        differentiate the output with respect to the activations).
      capture: also return the gated activations.
      **kwargs: passed to `apply_fn` (``train=True, mutable=["batch_stats"], rngs=...``).

    Returns:
      The model's output; with `capture`, `(output, activations)` where activations maps each
      group to one array per gate point.
    """
    program = trace_apply(apply_fn, variables, x, **kwargs)
    local = local_graph(program, graph)
    points = {g.name: local.gate_points[g.name] for g in graph.groups}
    masks = dict(masks or {})
    for name, mask in masks.items():
        size = graph[name].size
        if jnp.shape(mask) != (size,):
            raise ValueError(
                f"The mask of group {name!r} has shape {jnp.shape(mask)}; it needs ({size},), "
                "one value per channel."
            )
    if probes is not None:
        for name, values in probes.items():
            if name not in points or len(values) != len(points[name]):
                raise ValueError(
                    f"Probes for {name!r} do not match its {len(points.get(name, ()))} gate "
                    "points; build them with `probe_shapes`."
                )
    interpreter = _MaskedInterpreter(local, points, masks, probes or {}, capture)
    args = program_args(variables, x, kwargs)
    outs = interpreter.run(args)
    output = jax.tree_util.tree_unflatten(program.output_tree, outs)
    if capture:
        captured = {
            name: tuple(interpreter.captured[p.value_id] for p in pts)
            for name, pts in points.items()
        }
        return output, captured
    return output


def probe_shapes(
    apply_fn: Callable[..., Any], graph: ChannelGraph, variables: Any, x: Any, **kwargs: Any
) -> dict[str, tuple[jax.ShapeDtypeStruct, ...]]:
    """The shape of every gate point of every group, for an input like `x`."""
    program = trace_apply(apply_fn, variables, x, **kwargs)
    points = points_for(program, graph)
    return {
        name: tuple(jax.ShapeDtypeStruct(p.shape, program.dtypes[p.value_id]) for p in pts)
        for name, pts in points.items()
    }


def gate_points(
    apply_fn: Callable[..., Any], graph: ChannelGraph, variables: Any, x: Any, **kwargs: Any
) -> dict[str, tuple[GatePoint, ...]]:
    """Where each group is gated when the model runs on an input like `x`."""
    return points_for(trace_apply(apply_fn, variables, x, **kwargs), graph)


def activations_and_gradients(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    x: jax.Array,
    loss_fn: Callable[[Any], jax.Array],
    masks: Masks | None = None,
    **kwargs: Any,
) -> tuple[jax.Array, Any, PointValues, PointValues]:
    """Each group's activations and the gradient of a loss with respect to them.

    The gradient is taken with respect to a zero probe added at each gate point, so no weight
    gradient is computed. With a loss that sums over examples, row i of a gradient is example
    i's own dL_i/da_i (per-example gradients for free, since examples do not interact; with
    batch-norm in training mode they do, through the batch statistics).

    Args:
      apply_fn: the model function; graph: its channel graph; variables, x: as for the model.
      loss_fn: maps the model output to a scalar.
      masks: optional gates (see `gated_call`).
      **kwargs: passed to `apply_fn`.

    Returns:
      (loss, output, activations, gradients); activations and gradients map each group name to
      one array per gate point.
    """
    shapes = probe_shapes(apply_fn, graph, variables, x, **kwargs)
    zeros = {name: tuple(jnp.zeros(s.shape, s.dtype) for s in pts) for name, pts in shapes.items()}

    def loss_of_probes(probes):
        output, acts = gated_call(
            apply_fn, graph, variables, x, masks, probes=probes, capture=True, **kwargs
        )
        return loss_fn(output), (output, acts)

    (loss, (output, acts)), grads = jax.value_and_grad(loss_of_probes, has_aux=True)(zeros)
    return loss, output, acts, grads


def gated_apply_fn(apply_fn: Callable[..., Any], graph: ChannelGraph) -> Callable[..., Any]:
    """An apply function that reads its masks from ``variables["masks"]``.

    It has the signature of `apply_fn`, so a training loop can use it unchanged: keep the
    masks in the variables (e.g. `TrainState.masks`) and change them without recompiling.
    """

    def apply(variables: Mapping[str, Any], x: jax.Array, **kwargs: Any) -> Any:
        variables = dict(variables)
        masks = variables.pop("masks", None)
        return gated_call(apply_fn, graph, variables, x, masks, **kwargs)

    return apply


def map_over_masks(
    fn: Callable[[Masks], Any], mask_stack: Masks, *, batch_size: int | None = None
) -> Any:
    """Evaluates `fn(masks)` for every row of a stack of masks in one compiled call.

    Args:
      fn: a function of one set of masks (e.g. the loss of the gated model on a batch).
      mask_stack: per group, an array (num_candidates, group size).
      batch_size: None vmaps over all candidates at once; an integer evaluates that many at a
        time with `jax.lax.map` (same result, bounded memory).

    Returns:
      `fn`'s outputs stacked along a leading candidate axis.
    """
    if batch_size is None:
        return jax.vmap(fn)(dict(mask_stack))
    return jax.lax.map(fn, dict(mask_stack), batch_size=batch_size)


# --------------------------------------------------------------------------------------------


def program_args(variables: Any, x: Any, kwargs: Mapping[str, Any]) -> list[Any]:
    """The flat inputs of a program traced by `trace_apply(apply_fn, variables, x, **kwargs)`."""
    array_kwargs, _ = split_kwargs(kwargs)
    return (
        jax.tree_util.tree_leaves(variables)
        + jax.tree_util.tree_leaves(x)
        + jax.tree_util.tree_leaves(array_kwargs)
    )


def local_graph(program: TracedProgram, graph: ChannelGraph) -> ChannelGraph:
    """The graph of this trace of the model (gate points, reductions and counts for its value
    ids), checked to have the groups of `graph`."""
    local = analyse(program, strict=False)
    for group in graph.groups:
        if group.name not in local.gate_points:
            raise GraphError(
                f"Group {group.name!r} of the graph is not in this model call; build the graph "
                "from the same apply_fn and variables you run it with."
            )
        size = local[group.name].size
        if size != group.size:
            raise GraphError(
                f"Group {group.name!r} has {size} channels in these variables but {group.size} "
                "in the graph: rebuild the graph after pruning (channel_graph on the pruned "
                "model)."
            )
    return local


def points_for(program: TracedProgram, graph: ChannelGraph) -> dict[str, tuple[GatePoint, ...]]:
    """The gate points of this trace, checked against the graph's groups."""
    local = local_graph(program, graph)
    return {g.name: local.gate_points[g.name] for g in graph.groups}


def position_mask(
    refs: tuple[AxisRef, ...], size: int, masks: Masks, dtype: Any
) -> jax.Array | None:
    """Per position of an axis, the product of the masks of the groups along it (None when
    no group along it is masked)."""
    result = None
    for ref in refs:
        mask = masks.get(ref.group)
        if mask is None:
            continue
        mask = jnp.asarray(mask, dtype)
        if ref.channel_of_index is not None:
            owner = jnp.asarray(ref.channel_of_index)
            mask = jnp.where(owner >= 0, mask[jnp.maximum(owner, 0)], jnp.ones((), dtype))
        result = mask if result is None else result * mask
    if result is not None and result.shape != (size,):
        raise GraphError(f"A mask laid along an axis of {size} positions has {result.shape}.")
    return result


def masked_operands(local: ChannelGraph, index: int, invals: list[Any], masks: Masks) -> list[Any]:
    """Operands of equation `index` under masks: a reduction over channels reduces the masked
    operand, and the divisor of a mean over channels is the sum of the masks."""
    reduction = local.reductions.get(index)
    if reduction is not None:
        operand = invals[0]
        for axis, refs in reduction.axes.items():
            pm = position_mask(refs, operand.shape[axis], masks, operand.dtype)
            if pm is None:
                continue
            shape = [1] * operand.ndim
            shape[axis] = operand.shape[axis]
            pm = pm.reshape(shape)
            if reduction.kind == "sum":
                operand = operand * pm
            else:
                fill = -jnp.inf if reduction.kind == "max" else jnp.inf
                operand = jnp.where(pm > 0, operand, jnp.asarray(fill, operand.dtype))
        invals = [operand, *invals[1:]]
    for (eqn_index, j), spec in local.counts.items():
        if eqn_index != index:
            continue
        count = jnp.asarray(float(spec.other), jnp.float32)
        touched = False
        for refs, size in zip(spec.axes, spec.sizes, strict=True):
            pm = position_mask(refs, size, masks, jnp.float32)
            touched = touched or pm is not None
            count = count * (jnp.sum(pm) if pm is not None else size)
        if touched:
            dtype = jnp.result_type(invals[j])
            invals = list(invals)
            invals[j] = (1.0 / count if spec.inverse else count).astype(dtype)
    return invals


_OPAQUE_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


class _MaskedInterpreter(Interpreter):
    """Evaluates a traced program with gates: masks (and probes, captures) at gate points, and
    reductions and means over channels restricted to the unmasked ones."""

    def __init__(
        self,
        local: ChannelGraph,
        points: Mapping[str, tuple[GatePoint, ...]],
        masks: Masks,
        probes: PointValues,
        capture: bool,
    ) -> None:
        super().__init__(local.program)
        self.local = local
        self.by_value: dict[int, list[tuple[GatePoint, int]]] = {}
        for pts in points.values():
            for k, p in enumerate(pts):
                self.by_value.setdefault(p.value_id, []).append((p, k))
        self.masks = masks
        self.probes = probes
        self.capture = capture
        self.captured: dict[int, jax.Array] = {}
        self.done: set[int] = set()
        hooked = (set(local.reductions) | {i for i, _ in local.counts}) if masks else set()
        self.inline = frames_holding(self.program, hooked, set(self.by_value))

    def on_value(self, vid: int | None, value: Any) -> Any:
        if vid is None or vid not in self.by_value or vid in self.done:
            return value
        self.done.add(vid)
        for point, k in self.by_value[vid]:
            mask = self.masks.get(point.group)
            if mask is not None:
                value = value * expand_mask(mask, point, value)
            probe = self.probes.get(point.group)
            if probe is not None:
                value = value + probe[k]
        if self.capture:
            self.captured[vid] = value
        return value

    def apply(self, index: int, eqn: Any, invals: list[Any]) -> list[Any]:
        if self.masks:
            invals = masked_operands(self.local, index, invals, self.masks)
        return bind(eqn, invals)

    def call(self, eqn: Any, invals: list[Any], frame: tuple[int, ...]) -> list[Any]:
        # Custom-derivative calls run as they are (keeping their rules, e.g. relu'(0) = 0)
        # unless a gate, a masked reduction or a mean's divisor lies inside them.
        if eqn.primitive.name in _OPAQUE_CALLS and frame not in self.inline:
            return bind(eqn, invals)
        return self.eval_call(eqn, invals, frame)


def expand_mask(mask: jax.Array, point: GatePoint, value: jax.Array) -> jax.Array:
    """A group's mask laid along the gated axis of `value`, broadcastable against it."""
    mask = jnp.asarray(mask, dtype=value.dtype)
    if point.channel_of_index is not None:
        owner = jnp.asarray(point.channel_of_index)
        mask = jnp.where(owner >= 0, mask[jnp.maximum(owner, 0)], jnp.ones((), value.dtype))
    shape = [1] * value.ndim
    shape[point.axis] = value.shape[point.axis]
    return mask.reshape(shape)
