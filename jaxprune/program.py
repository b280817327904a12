"""The pruned program: the model's own traced program, replayed at the pruned widths.

A pruned model must run without its module: real models hard-code their widths (`nn.Conv(64)`),
and re-running their code at other widths is unsafe (a `if residual.shape != y.shape` branch can
take another path when the kept widths happen to coincide). So the pruned model is the *traced
program* of the original, evaluated equation by equation with the static shapes of the channel
axes rewritten, using what the channel graph recorded about every value:

* reshape sizes, broadcast shapes, split sizes, slice limits and the `feature_group_count` of
  depthwise convolutions take the kept widths;
* constants (a closed-over array, a literal vector) and sources (`iota`, random bits) are
  computed at the original shape and keep the kept channels' entries, so ``x * jnp.arange(C)``
  and dropout give what the masked model gives;
* the divisor of a mean over channels (a LayerNorm's statistics) becomes the kept count;
* custom derivative rules on channel values (`jax.nn.relu`'s) are kept when their rule only
  works elementwise, which covers the usual activations.

`PrunedProgram` is callable like the original ``apply_fn(variables, x, **kwargs)``. The original
is retraced (at its original widths) for every new input shape or static keyword, analysed, and
the replay is jitted and cached, so it runs at any batch size and under `jit`, `grad`, `vmap`
and `jax.export`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune.graph import SOURCES, AxisRefs, ChannelGraph, GraphError, analyse, kept_positions
from jaxprune.interpret import Interpreter, bind
from jaxprune.trace import Path, open_jaxpr, path_of, split_kwargs, sub_program, trace_apply


class ReplayError(RuntimeError):
    """The pruned program could not be rewritten; the message names the operation and line."""


def axis_positions(refs: Sequence[Any], size: int, keep: Mapping[str, np.ndarray]) -> np.ndarray:
    """The positions of an axis of `size` that survive `keep` (intersected over its groups)."""
    positions = None
    for ref in refs:
        if ref.group in keep:
            kept = kept_positions(ref.channel_of_index, keep[ref.group])
            positions = kept if positions is None else np.intersect1d(positions, kept)
    if positions is None:
        return np.arange(size)
    # One group's kept positions are already sorted, unique and in range (the usual case);
    # anything else is intersected with the axis.
    in_range = positions.size == 0 or (positions[0] >= 0 and positions[-1] < size)
    if not in_range or np.any(np.diff(positions) <= 0):
        positions = np.intersect1d(np.arange(size), positions)
    return positions


def kept_axes(
    axes: AxisRefs,
    shape: Sequence[int],
    keep: Mapping[str, np.ndarray],
    memo: dict[Any, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """For each axis that loses positions, the positions it keeps.

    `memo` caches the positions by axis size and refs across calls: most values of a program
    share their channel axes with many others.
    """
    found = {}
    for axis, refs in axes.items():
        size = shape[axis]
        key = (size, tuple((ref.group, id(ref.channel_of_index)) for ref in refs))
        positions = None if memo is None else memo.get(key)
        if positions is None:
            positions = axis_positions(refs, size, keep)
            if memo is not None:
                memo[key] = positions
        if positions.size != size:
            found[axis] = positions
    return found


def take_positions(value: Any, positions: Mapping[int, np.ndarray]) -> Any:
    for axis, keep in sorted(positions.items()):
        value = jnp.take(value, jnp.asarray(keep), axis=axis)
    return value


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """What changes in one traced program when `keep` is applied.

    Attributes:
      graph: the channel graph of this trace.
      keep: kept channel indices per group.
      positions: for every value that loses channels, the positions each axis keeps.
      const_positions: the same for constant operands, by (equation index, operand).
      new_shapes: the pruned shape of every value that changes.
      counts: the new value of every mean's divisor literal, by (equation index, operand).
      touched_frames: the call frames that hold something to rewrite.
    """

    graph: ChannelGraph
    keep: Mapping[str, np.ndarray]
    positions: Mapping[int, Mapping[int, np.ndarray]]
    const_positions: Mapping[tuple[int, int], Mapping[int, np.ndarray]]
    new_shapes: Mapping[int, tuple[int, ...]]
    counts: Mapping[tuple[int, int], float]
    touched_frames: frozenset

    def shape(self, vid: int | None) -> tuple[int, ...] | None:
        if vid is None:
            return None
        return self.new_shapes.get(vid, self.graph.program.shapes[vid])


def make_plan(graph: ChannelGraph, keep: Mapping[str, np.ndarray]) -> ReplayPlan:
    """The rewrite of `graph.program` for `keep` (validated channel indices per group)."""
    program = graph.program
    positions = {}
    new_shapes = {}
    # The refs' channel maps live in the graph for the whole call, so their ids are stable keys.
    memo: dict[Any, np.ndarray] = {}
    for vid, axes in graph.value_axes.items():
        shape = program.shapes[vid]
        found = kept_axes(axes, shape, keep, memo)
        if found:
            positions[vid] = found
            new_shapes[vid] = tuple(
                found[ax].size if ax in found else n for ax, n in enumerate(shape)
            )
    const_positions = {}
    for site, axes in graph.const_axes.items():
        eqn_index, j = site
        shape = np.shape(program.eqns[eqn_index].inputs[j].value)
        found = kept_axes(axes, shape, keep, memo)
        if found:
            const_positions[site] = found
    counts = {}
    for site, spec in graph.counts.items():
        count = spec.other
        for refs, size in zip(spec.axes, spec.sizes, strict=True):
            count *= axis_positions(refs, size, keep).size
        total = spec.other * int(np.prod(spec.sizes))
        if count != total:
            counts[site] = 1.0 / count if spec.inverse else float(count)
    touched = {i for i, _ in const_positions} | {i for i, _ in counts}
    for k, eqn in enumerate(program.eqns):
        if any(o in new_shapes for o in eqn.outputs):
            touched.add(k)
    frames = set()
    for (frame, _), index in program.eqn_index.items():
        if index in touched:
            frames.update(frame[:n] for n in range(1, len(frame) + 1))
    return ReplayPlan(
        graph, dict(keep), positions, const_positions, new_shapes, counts, frozenset(frames)
    )


class _Replay(Interpreter):
    """Evaluates a traced program at the pruned widths (see the module docstring).

    With ``differentiable=False`` custom derivative rules are not rebuilt at the new widths
    (the values are the same; only a replay that is differentiated needs them, and rebuilding
    one costs an abstract evaluation per activation).
    """

    def __init__(self, plan: ReplayPlan, differentiable: bool = True) -> None:
        super().__init__(plan.graph.program)
        self.plan = plan
        self.differentiable = differentiable

    def apply(self, index: int, eqn: Any, invals: list[Any]) -> list[Any]:
        plan, program = self.plan, self.program
        flat = program.eqns[index]
        invals = list(invals)
        for j in range(len(invals)):
            positions = plan.const_positions.get((index, j))
            if positions is not None:
                invals[j] = take_positions(invals[j], positions)
            count = plan.counts.get((index, j))
            if count is not None:
                invals[j] = jnp.asarray(count, jnp.result_type(invals[j]))
        outs_changed = any(o in plan.new_shapes for o in flat.outputs)
        if not outs_changed:
            return bind(eqn, invals)
        if eqn.primitive.name in SOURCES:
            outs = bind(eqn, invals)
            return [
                take_positions(v, plan.positions[o]) if o in plan.positions else v
                for v, o in zip(outs, flat.outputs, strict=True)
            ]
        params = self.rewrite_params(eqn, flat, invals)
        try:
            outs = bind(eqn, invals, params)
        except Exception as e:
            raise ReplayError(self.failure(flat, f"{type(e).__name__}: {e}")) from e
        for value, o in zip(outs, flat.outputs, strict=True):
            if tuple(np.shape(value)) != plan.shape(o):
                raise ReplayError(
                    self.failure(flat, f"shape {np.shape(value)} where {plan.shape(o)} is due")
                )
        return outs

    def rewrite_params(self, eqn: Any, flat: Any, invals: Sequence[Any]) -> Mapping[str, Any]:
        """The equation's static parameters at the pruned widths."""
        name, params, plan = eqn.primitive.name, dict(eqn.params), self.plan
        out_shape = plan.shape(flat.outputs[0])
        if name == "reshape":
            params["new_sizes"] = out_shape
        elif name == "broadcast_in_dim":
            params["shape"] = out_shape
        elif name == "conv_general_dilated" and params["feature_group_count"] > 1:
            dn = params["dimension_numbers"]
            old_in = self.program.shapes[flat.inputs[0]][dn.lhs_spec[1]]
            if params["feature_group_count"] == old_in:  # depthwise
                params["feature_group_count"] = np.shape(invals[0])[dn.lhs_spec[1]]
        elif name == "split":
            axis = params["axis"]
            params["sizes"] = tuple(plan.shape(o)[axis] for o in flat.outputs)
        elif name == "slice":
            in_shape = self.program.shapes[flat.inputs[0]]
            params["limit_indices"] = tuple(
                np.shape(invals[0])[ax] if limit == in_shape[ax] else limit
                for ax, limit in enumerate(params["limit_indices"])
            )
        elif name == "dynamic_slice":
            in_shape = self.program.shapes[flat.inputs[0]]
            params["slice_sizes"] = tuple(
                np.shape(invals[0])[ax] if size == in_shape[ax] else size
                for ax, size in enumerate(params["slice_sizes"])
            )
        return params

    def failure(self, flat: Any, what: str) -> str:
        where = "" if flat.where.startswith("<") else f" (model line {flat.where})"
        return (
            f"The pruned program could not rewrite '{flat.primitive}'{where}: {what}. This is "
            "an operation the channel graph accepted but the pruned program cannot resize; "
            "please report it with the model. Until then, mask the channels (gates.gated_call) "
            "instead of removing them."
        )

    def call(self, eqn: Any, invals: list[Any], frame: tuple[int, ...]) -> list[Any]:
        if frame not in self.plan.touched_frames:
            return bind(eqn, invals)
        name = eqn.primitive.name
        if name == "custom_jvp_call" and self.differentiable:
            return self.custom_jvp(eqn, invals, frame)
        if name in ("checkpoint", "remat", "remat2"):
            policy = eqn.params.get("policy")
            prevent_cse = eqn.params.get("prevent_cse", True)
            body = jax.checkpoint(
                lambda *args: self.eval_call(eqn, list(args), frame),
                policy=policy,
                prevent_cse=prevent_cse,
            )
            return list(body(*invals))
        # jit bodies are inlined; a custom_vjp rule is dropped (its primal is differentiated).
        return self.eval_call(eqn, invals, frame)

    def custom_jvp(self, eqn: Any, invals: list[Any], frame: tuple[int, ...]) -> list[Any]:
        """A custom-derivative call at new widths: the body is replayed here, and the rule is
        re-evaluated at the new shapes when it only needs its shapes mapped (elementwise
        rules such as relu's); otherwise the replayed body is differentiated as it is."""
        num_consts = eqn.params["num_consts"]
        ids = self.program.frame_ids[frame[:-1]]
        old_in = [tuple(v.aval.shape) for v in eqn.invars]
        old_out = [tuple(v.aval.shape) for v in eqn.outvars]
        new_in = [tuple(np.shape(v)) for v in invals]
        new_out = [self.plan.shape(ids.get(v)) or tuple(v.aval.shape) for v in eqn.outvars]
        shape_map = _shape_map(zip(old_in + old_out, new_in + new_out, strict=True))

        def primal(*args):
            return self.eval_call(eqn, list(args), frame)

        if shape_map is None:
            return primal(*invals)
        jvp_fun = eqn.params["jvp_jaxpr_fun"]
        n_args = len(invals) - num_consts

        def rule(primals, tangents):
            jaxpr, consts, out_zeros = jvp_fun.call_wrapped(*([False] * n_args))
            outs = _eval_mapped(
                jaxpr, consts, [*primals[num_consts:], *tangents[num_consts:]], shape_map
            )
            n_out = len(out_zeros)
            out_primals, nz_tangents = outs[:n_out], iter(outs[n_out:])
            out_tangents = [
                jnp.zeros_like(p) if zero else next(nz_tangents)
                for p, zero in zip(out_primals, out_zeros, strict=True)
            ]
            return out_primals, out_tangents

        wrapped = jax.custom_jvp(lambda *args: primal(*args))
        wrapped.defjvp(lambda primals, tangents: rule(primals, tangents))
        try:
            jax.eval_shape(
                lambda *a: jax.jvp(lambda *p: wrapped(*p), a, a),
                *[jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)) for v in invals],
            )
        except Exception:  # a rule that is more than elementwise: differentiate the body
            return primal(*invals)
        return list(wrapped(*invals))


def _shape_map(pairs: Any) -> dict[tuple[int, ...], tuple[int, ...]] | None:
    """Original shape -> new shape, or None when one original shape would need two."""
    mapping: dict[tuple[int, ...], tuple[int, ...]] = {}
    for old, new in pairs:
        if mapping.setdefault(old, new) != new:
            return None
    return mapping


def _eval_mapped(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], shapes: Mapping) -> list:
    """Evaluates a jaxpr at new shapes, mapping every static shape through `shapes`."""
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return atom.val if isinstance(atom, jcore.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(a) for a in eqn.invars]
        sub = sub_program(eqn)
        if sub is not None:
            inner, inner_consts = open_jaxpr(sub)
            outs = _eval_mapped(inner, inner_consts, invals, shapes)
        else:
            params = dict(eqn.params)
            for key in ("shape", "new_sizes"):
                if key in params and params[key] is not None:
                    params[key] = shapes.get(tuple(params[key]), tuple(params[key]))
            outs = bind(eqn, invals, params)
        for var, value in zip(eqn.outvars, outs, strict=True):
            expected = shapes.get(tuple(var.aval.shape), tuple(var.aval.shape))
            if tuple(np.shape(value)) != expected:
                raise ValueError(f"{eqn.primitive} gives {np.shape(value)}, not {expected}")
            if not isinstance(var, jcore.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _freeze(obj: Any) -> Any:
    """A hashable stand-in for static keyword arguments (lists, dicts)."""
    if isinstance(obj, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, list | tuple | set | frozenset):
        return (type(obj).__name__, tuple(_freeze(v) for v in obj))
    try:
        hash(obj)
    except TypeError:
        return repr(obj)
    return obj


def _struct(value: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value))


class PrunedProgram:
    """The smaller model as a function: ``pruned(variables, x, **kwargs)``.

    It has the calling convention of the original `apply_fn` and needs no module: it replays the
    original's traced program at the kept widths (see the module docstring). Any input shape,
    jit, grad, vmap and `jax.export` work.

    Attributes:
      graph: the channel graph of the original model it was pruned from.
      keep: per group, the indices (into the original's channels) that are kept.
      variable_shapes: the shape each variable of the pruned model must have, by path.
    """

    def __init__(self, graph: ChannelGraph, keep: Mapping[str, np.ndarray]) -> None:
        self.graph = graph
        self.keep = {name: np.asarray(idx) for name, idx in keep.items()}
        self._cache: dict[Any, tuple[Callable[..., Any], ReplayPlan]] = {}
        plan = make_plan(graph, self.keep)
        prog = graph.program
        self.variable_shapes: dict[Path, tuple[int, ...]] = {
            p: plan.shape(v) for p, v in prog.variable_inputs.items()
        }
        self._own_key = self._key(prog.input_struct, dict(graph.call_kwargs))
        self._cache[self._own_key] = (self._compile(plan), plan)
        self.__name__ = "pruned_" + getattr(graph.apply_fn, "__name__", "apply")

    def __call__(self, variables: Any, x: Any, **kwargs: Any) -> Any:
        self.check_variables(variables)
        fn, _ = self.plan_for(x, kwargs)
        array_kwargs, _ = split_kwargs(kwargs)
        return fn(variables, x, array_kwargs)

    def evaluate(self, variables: Any, x: Any, **kwargs: Any) -> Any:
        """What ``self(variables, x, **kwargs)`` returns, computed op by op without compiling.

        For a one-off check (`surgery.prune`'s self-check): compiling the whole program costs
        far more than running it once at a small batch. Not differentiable through custom
        derivative rules (the primal is differentiated instead).
        """
        self.check_variables(variables)
        _, plan = self.plan_for(x, kwargs)
        array_kwargs, _ = split_kwargs(kwargs)
        args = (
            jax.tree_util.tree_leaves(variables)
            + jax.tree_util.tree_leaves(x)
            + jax.tree_util.tree_leaves(array_kwargs)
        )
        outs = _Replay(plan, differentiable=False).run(args)
        return jax.tree_util.tree_unflatten(plan.graph.program.output_tree, outs)

    def plan_for(self, x: Any, kwargs: Mapping[str, Any]) -> tuple[Callable[..., Any], ReplayPlan]:
        """The jitted replay and its plan for an input like `x` and these keywords."""
        key = self._key(_struct(x), kwargs)
        if key not in self._cache:
            if self.graph.apply_fn is None:
                raise GraphError(
                    "This pruned program was built from a graph without its apply_fn "
                    "(graph.analyse of a bare program), so it runs only at the traced input "
                    "shape and keywords. Build the graph with channel_graph(apply_fn, "
                    "variables, x) to run it at other shapes."
                )
            program = trace_apply(
                self.graph.apply_fn, self.graph.program.variables_struct, _struct(x), **kwargs
            )
            local = analyse(program, strict=False)
            for name, idx in self.keep.items():
                group = self.graph[name]
                if name not in local or local[name].size != group.size:
                    raise GraphError(
                        f"Group {name!r} ({group.size} channels) is not in the model traced "
                        f"at input {tuple(np.shape(x))} with {sorted(kwargs)}: the model takes "
                        "another path there. Build the graph at that input instead."
                    )
                del idx
            plan = make_plan(local, self.keep)
            self._cache[key] = (self._compile(plan), plan)
        return self._cache[key]

    def _key(self, x: jax.ShapeDtypeStruct, kwargs: Mapping[str, Any]) -> Any:
        arrays, static = split_kwargs(kwargs)
        array_struct = jax.tree_util.tree_map(_struct, arrays)
        leaves, tree = jax.tree_util.tree_flatten(array_struct)
        return (
            tuple(x.shape),
            str(x.dtype),
            _freeze(static),
            str(tree),
            tuple((tuple(s.shape), str(s.dtype)) for s in leaves),
        )

    @staticmethod
    def _compile(plan: ReplayPlan) -> Callable[..., Any]:
        program = plan.graph.program

        def run(variables: Any, x: Any, array_kwargs: Any) -> Any:
            args = (
                jax.tree_util.tree_leaves(variables)
                + jax.tree_util.tree_leaves(x)
                + jax.tree_util.tree_leaves(array_kwargs)
            )
            outs = _Replay(plan).run(args)
            return jax.tree_util.tree_unflatten(program.output_tree, outs)

        return jax.jit(run)

    def check_variables(self, variables: Any) -> None:
        """Refuses variables that are not the pruned model's (e.g. the unpruned ones)."""
        leaves = {
            path_of(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(variables)
        }
        if leaves.keys() != self.variable_shapes.keys():
            missing = sorted(set(self.variable_shapes) - set(leaves))[:3]
            extra = sorted(set(leaves) - set(self.variable_shapes))[:3]
            raise GraphError(
                "These variables are not the pruned model's: "
                f"missing {['/'.join(p) for p in missing]}, unexpected "
                f"{['/'.join(p) for p in extra]}. Pass pruned.variables."
            )
        wrong = [p for p, s in self.variable_shapes.items() if leaves[p] != s]
        if wrong:
            p = wrong[0]
            raise GraphError(
                f"The variable {'/'.join(p)} has shape {leaves[p]}, but the pruned model needs "
                f"{self.variable_shapes[p]} ({len(wrong)} such leaves). Pass pruned.variables "
                "(the output of prune), not the variables before pruning."
            )
