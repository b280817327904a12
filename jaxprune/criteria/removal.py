"""The loss of the model with each channel of one group removed alone, for all channels at once.

Removing channel c of group g leaves everything before g's gate unchanged, so the program is
run once with the current masks (the *base* run, recording every value), and each candidate
re-runs only what depends on the removal, reading every other value from the base run. The
candidates are mapped over with `jax.lax.map` (vmapped in chunks of `batch_size`), and since the
recorded values do not depend on the candidate they are computed once, outside the map.

Two ways to apply the removal:

* ``"mask"``: the candidate's mask (the base mask with channel c zeroed) multiplies g's gate
  values, and everything downstream is recomputed. Always exact (masking == removing).
* ``"delta"``: when every consumer of g is a convolution reading g's gate value directly (a
  plain conv chain), removing channel c changes each consumer's output by exactly one input
  channel's contribution: ``conv(u, W) - conv(u[..., c], W[:, :, c, :])``. The correction is a
  convolution with a single input channel (1 / C_in of the layer), so the consumer itself is
  not recomputed, only what follows it. Used automatically when it applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxprune.gates import expand_mask, local_graph, masked_operands, program_args
from jaxprune.graph import ChannelGraph, GatePoint
from jaxprune.interpret import bind
from jaxprune.trace import Const, TracedProgram, open_jaxpr, sub_program, trace_apply

# Value id of a consumer conv's output -> (lhs channel axis, rhs input-feature axis).
DeltaSites = Mapping[int, tuple[int, int]]


def delta_sites(program: TracedProgram, points: tuple[GatePoint, ...], size: int) -> DeltaSites:
    """The consumer convolutions through which one-channel removals can be applied as deltas.

    Returns an empty mapping unless every path from the group's gate values to the model output
    passes through a convolution (one feature group) that reads a gate value directly, with the
    channels on its input-feature axis in order, and no such gate value is itself computed from
    another gate value or from a consumer's output (as in a residual stage).
    """
    seeds = {p.value_id: p for p in points}
    downstream: set[int] = set()  # values computed from the gate values, other than by a site
    sites: dict[int, tuple[int, int]] = {}
    for eqn in program.eqns:
        inputs = [i for i in eqn.inputs if not isinstance(i, Const)]
        if not any(i in seeds or i in downstream for i in inputs):
            continue
        if eqn.primitive == "conv_general_dilated":
            lhs, rhs = eqn.inputs
            dn = eqn.params["dimension_numbers"]
            point = seeds.get(lhs) if not isinstance(lhs, Const) else None
            if (
                point is not None
                and lhs not in downstream
                and not isinstance(rhs, Const)
                and rhs not in seeds
                and rhs not in downstream
                and eqn.params["feature_group_count"] == 1
                and eqn.params["batch_group_count"] == 1
                and point.channel_of_index is None
                and point.axis == dn.lhs_spec[1]
                and program.shapes[lhs][point.axis] == size
            ):
                sites[eqn.outputs[0]] = (dn.lhs_spec[1], dn.rhs_spec[1])
                continue
        downstream.update(eqn.outputs)
    outputs = {o for o in program.output_ids if not isinstance(o, Const)}
    if not sites or outputs & (downstream | set(seeds)):
        return {}
    # A gate value recomputed from a consumer's output would change in more than channel c.
    affected = set(sites)
    for eqn in program.eqns:
        if any(not isinstance(i, Const) and i in affected for i in eqn.inputs):
            affected.update(eqn.outputs)
    if affected & set(seeds):
        return {}
    return sites


class _Runner:
    """Evaluates a traced program with gates; records or reuses values by value id.

    `base` None: a full run, recording every value (after gating) in `self.values`, and the
    ungated values of the target group's gate points in `self.ungated`. With `base`: a
    candidate run that recomputes only values depending on the candidate (`change`) and reads
    all others from `base`.
    """

    def __init__(
        self,
        local: ChannelGraph,
        points: Mapping[str, tuple[GatePoint, ...]],
        masks: Mapping[str, jax.Array],
        target: str,
        base: Mapping[int, jax.Array] | None = None,
        ungated: Mapping[int, jax.Array] | None = None,
        change: Callable[[int, Any, list[Any]], Any] | None = None,
    ) -> None:
        self.local = local
        self.program = local.program
        self.by_value: dict[int, list[GatePoint]] = {}
        for pts in points.values():
            for p in pts:
                self.by_value.setdefault(p.value_id, []).append(p)
        self.masks = masks
        self.target = target
        self.base = base
        self.ungated_base = ungated or {}
        self.change = change
        self.values: dict[int, jax.Array] = {}
        self.ungated: dict[int, jax.Array] = {}
        self.dependent: set[int] = set()
        self.done: set[int] = set()
        # Reductions and means over the target's channels follow its (candidate) mask.
        self.target_hooked = {
            index
            for index, red in local.reductions.items()
            if any(r.group == target for refs in red.axes.values() for r in refs)
        } | {
            index
            for (index, _), spec in local.counts.items()
            if any(r.group == target for refs in spec.axes for r in refs)
        }

    def run(self, args: list[Any]) -> list[Any]:
        closed = self.program.closed_jaxpr
        return self.eval(closed.jaxpr, list(closed.consts), args, ())

    def settle(self, vid: int | None, value: Any) -> Any:
        """Gates a freshly computed value once and records it."""
        if vid is None or vid in self.done:
            return value
        self.done.add(vid)
        points = self.by_value.get(vid, ())
        value = self._gate_fresh(vid, value)
        if any(p.group == self.target for p in points):
            # Gated by every other group but not by the target: what a candidate re-gates.
            self.ungated[vid] = value
            for point in points:
                if point.group == self.target:
                    value = value * expand_mask(self.masks[self.target], point, value)
        self.values[vid] = value
        return value

    def eval(self, jaxpr: Any, consts: list[Any], args: list[Any], frame: tuple[int, ...]) -> Any:
        ids = self.program.frame_ids[frame]
        env: dict[Any, Any] = {}

        def read(atom: Any) -> Any:
            return atom.val if isinstance(atom, jcore.Literal) else env[atom]

        def is_dependent(atom: Any) -> bool:
            return not isinstance(atom, jcore.Literal) and ids.get(atom) in self.dependent

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = self.settle(ids.get(var), value) if self.base is None else value
        for k, eqn in enumerate(jaxpr.eqns):
            program = sub_program(eqn)
            out_ids = [None if isinstance(v, jcore.DropVar) else ids.get(v) for v in eqn.outvars]
            if program is not None:
                inner, inner_consts = open_jaxpr(program)
                outs = self.eval(inner, inner_consts, [read(a) for a in eqn.invars], frame + (k,))
                for var, value in zip(eqn.outvars, outs, strict=True):
                    if not isinstance(var, jcore.DropVar):
                        env[var] = value
                continue
            index = self.program.eqn_index[(frame, k)]
            if self.base is None:
                outs = self._bind(index, eqn, [read(a) for a in eqn.invars])
                for var, vid, value in zip(eqn.outvars, out_ids, outs, strict=True):
                    if vid is not None:
                        env[var] = self.settle(vid, value)
                continue
            # A candidate run: reuse the base value unless the candidate changes it.
            dependent = any(is_dependent(a) for a in eqn.invars) or (
                self.change is None and index in self.target_hooked
            )
            changed = None
            if not dependent and self.change is not None and len(out_ids) == 1:
                changed = self.change(out_ids[0], eqn, [read(a) for a in eqn.invars])
            if changed is not None:
                outs = [changed]
            elif dependent:
                outs = self._bind(index, eqn, [read(a) for a in eqn.invars])
            else:
                outs = [None if vid is None else self.base[vid] for vid in out_ids]
            for var, vid, value in zip(eqn.outvars, out_ids, outs, strict=True):
                if vid is None:
                    continue
                if dependent or changed is not None:
                    self.dependent.add(vid)
                    value = self._gate_fresh(vid, value)
                env[var] = self._gate_target(vid, value)
        return [read(v) for v in jaxpr.outvars]

    def _gate_fresh(self, vid: int, value: Any) -> Any:
        for point in self.by_value.get(vid, ()):
            mask = self.masks.get(point.group)
            if mask is not None and point.group != self.target:
                value = value * expand_mask(mask, point, value)
        return value

    def _gate_target(self, vid: int, value: Any) -> Any:
        """In a mask-mode candidate run, the target group's gate values take the candidate
        mask (`masks[target]`), applied to the ungated value."""
        if self.change is not None or vid in self.done:
            return value
        points = [p for p in self.by_value.get(vid, ()) if p.group == self.target]
        if not points:
            return value
        self.done.add(vid)
        ungated = value if vid in self.dependent else self.ungated_base[vid]
        self.dependent.add(vid)
        for point in points:
            ungated = ungated * expand_mask(self.masks[self.target], point, ungated)
        return ungated

    def _bind(self, index: int, eqn: Any, invals: list[Any]) -> list[Any]:
        return bind(eqn, masked_operands(self.local, index, invals, self.masks))


def removal_losses(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    x: jax.Array,
    loss_fn: Callable[[Any], jax.Array],
    group: str,
    masks: Mapping[str, jax.Array] | None = None,
    *,
    batch_size: int | None = None,
    mode: str = "auto",
    **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """The loss with the current masks, and with each channel of `group` removed alone.

    Traceable (call it inside `jax.jit`); `loss_fn` maps the model output to a scalar.

    Args:
      apply_fn, graph, variables, x: the model, its channel graph, its variables, a batch.
      loss_fn: output -> scalar loss.
      group: the group whose channels are removed one at a time.
      masks: the current masks (removed channels stay removed in every candidate).
      batch_size: candidates evaluated at a time (None: all at once).
      mode: "auto" (delta where it applies, else mask), "mask" or "delta".
      **kwargs: passed to `apply_fn`.

    Returns:
      (base loss, losses of shape (group size,)); entry c is the loss without channel c.

    Raises:
      ValueError: an unknown mode, or "delta" asked where it does not apply.
    """
    if mode not in ("auto", "mask", "delta"):
        raise ValueError(f"mode must be 'auto', 'mask' or 'delta', got {mode!r}.")
    program = trace_apply(apply_fn, variables, x, **kwargs)
    local = local_graph(program, graph)
    points = {g.name: local.gate_points[g.name] for g in graph.groups}
    size = graph[group].size
    base_masks = {name: jnp.asarray(m, jnp.float32) for name, m in (masks or {}).items()}
    target_mask = base_masks.get(group, jnp.ones(size, jnp.float32))
    sites = delta_sites(program, points[group], size) if mode != "mask" else {}
    if _Runner(local, points, {}, group).target_hooked:
        sites = {}  # a reduction over the channels also sees the removal: not a plain chain
    if mode == "delta" and not sites:
        raise ValueError(
            f"Group {group!r} cannot be scored with deltas: its channels are not read only by "
            "convolutions at its gate values. Use mode='mask' or 'auto'."
        )
    args = program_args(variables, x, kwargs)

    def loss_of(outs: list[Any]) -> jax.Array:
        return loss_fn(jax.tree_util.tree_unflatten(program.output_tree, outs))

    base_runner = _Runner(local, points, {**base_masks, group: target_mask}, group)
    base_loss = loss_of(base_runner.run(args))
    recorded, ungated = base_runner.values, base_runner.ungated

    if sites:

        def candidate(c: jax.Array) -> jax.Array:
            def change(vid: int, eqn: Any, invals: list[Any]) -> Any:
                if vid not in sites:
                    return None
                lhs_axis, rhs_axis = sites[vid]
                lhs, rhs = invals
                one = [
                    jax.lax.dynamic_slice_in_dim(lhs, c, 1, axis=lhs_axis),
                    jax.lax.dynamic_slice_in_dim(rhs, c, 1, axis=rhs_axis),
                ]
                return recorded[vid] - bind(eqn, one)[0]

            runner = _Runner(local, points, base_masks, group, recorded, ungated, change)
            return loss_of(runner.run(args))

    else:

        def candidate(c: jax.Array) -> jax.Array:
            mask = target_mask * (1.0 - jax.nn.one_hot(c, size, dtype=jnp.float32))
            runner = _Runner(local, points, {**base_masks, group: mask}, group, recorded, ungated)
            return loss_of(runner.run(args))

    removed = jax.lax.map(candidate, jnp.arange(size), batch_size=min(batch_size or size, size))
    return base_loss, removed
