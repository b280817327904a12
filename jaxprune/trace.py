"""Trace an `apply_fn(variables, x)` into one flat list of equations over named inputs.

Every analysis in jaxprune (the channel graph, the cost model, the gated interpreter) reads the
model through its jaxpr, never through its Python code. This module does the tracing once:

* the variables are flattened, so each program input is a known tree path
  (``("params", "conv1", "kernel")``) or the model input;
* call-like sub-programs (``jit``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``, ...) are
  inlined, and each value gets one integer id however deeply it was nested, so an analysis sees a
  single straight-line program;
* the nested jaxpr is kept too, with a map from every `Var` object to its id, so an interpreter
  can run the original program and still address values by the analysis' ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jaxprune.tree_paths import Path, path_of  # noqa: F401  (Path is re-exported)

# Call-like primitives whose sub-program maps its inputs and outputs one to one onto the
# equation's own; the analysis looks through them. Value: the params key holding the program.
CALL_PRIMITIVES: Mapping[str, str] = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Const:
    """A literal or closed-over constant used as an equation operand."""

    value: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.value))


Operand = int | Const


class SourceLine:
    """The user's source line of an equation, found only when a message asks for it.

    Walking an equation's traceback costs more than the rest of the inlining, and the line is
    only read for error messages; so it is resolved on first use and then kept. Inside a
    library's jit (``jnp.pad``) the enclosing call's line stands in.
    """

    __slots__ = ("_eqn", "_outer", "_line")

    def __init__(self, eqn: Any, outer: SourceLine | None = None) -> None:
        self._eqn, self._outer, self._line = eqn, outer, None

    def __str__(self) -> str:
        if self._line is None:
            line = source_line(self._eqn)
            if line.startswith("<") and self._outer is not None:
                line = str(self._outer)
            self._line, self._eqn, self._outer = line, None, None
        return self._line


@dataclasses.dataclass(frozen=True)
class FlatEqn:
    """One primitive application of the inlined program.

    Attributes:
      primitive: the primitive's name.
      params: its static parameters (sub-programs of control-flow primitives stay inside).
      inputs: value ids, or `Const` for literals and constants.
      outputs: value ids.
      source: where the equation was made (a `SourceLine`, or the line as a string).
    """

    primitive: str
    params: Mapping[str, Any]
    inputs: tuple[Operand, ...]
    outputs: tuple[int, ...]
    source: SourceLine | str

    @property
    def where(self) -> str:
        """The user's source line, for error messages ('<unknown source>' if none)."""
        return str(self.source)


@dataclasses.dataclass(frozen=True)
class TracedProgram:
    """An `apply_fn` traced for one input shape.

    Attributes:
      closed_jaxpr: the program as JAX traced it (nested).
      input_paths: for each program input (in order), its tree path; the model input is
        ``("<input>",)`` and array keyword arguments are ``("<kwargs>", ...)``.
      input_ids: the value id of each program input.
      output_ids: the value id (or `Const`) of each program output, in flattened order.
      output_tree: the pytree structure of the function's result.
      state_output_paths: for outputs that are updated variables (flax ``mutable=`` results),
        their variable path; None for the model's own outputs.
      eqns: the flat, inlined equations.
      shapes: shape of every value id.
      dtypes: dtype of every value id.
      frame_ids: for every (sub-)program frame, the id of each of its `Var`s. A frame is the
        path of equation indices from the top program to the call that runs it (the top
        program is ``()``). Frames matter because JAX shares one sub-jaxpr object between
        identical calls (two relus of one shape), so a `Var` alone does not name a value.
      eqn_index: for every non-call equation of the nested program, ``(frame, k)`` (its frame
        and its position there), the index of its `FlatEqn` in `eqns`.
      variables_struct: the variables as `jax.ShapeDtypeStruct`s (the tree that was traced).
      input_struct: the model input as a `jax.ShapeDtypeStruct`.
    """

    closed_jaxpr: Any
    input_paths: tuple[Path, ...]
    input_ids: tuple[int, ...]
    output_ids: tuple[Operand, ...]
    output_tree: Any
    state_output_paths: tuple[Path | None, ...]
    eqns: tuple[FlatEqn, ...]
    shapes: Mapping[int, tuple[int, ...]]
    dtypes: Mapping[int, Any]
    frame_ids: Mapping[tuple[int, ...], Mapping[Hashable, int]]
    eqn_index: Mapping[tuple[tuple[int, ...], int], int]
    variables_struct: Any
    input_struct: Any

    @property
    def variable_inputs(self) -> dict[Path, int]:
        """Value id of every variable leaf, by its path."""
        return {
            p: i for p, i in zip(self.input_paths, self.input_ids, strict=True) if p[0][0] != "<"
        }

    @property
    def model_input_ids(self) -> tuple[int, ...]:
        return tuple(
            i for p, i in zip(self.input_paths, self.input_ids, strict=True) if p == ("<input>",)
        )

    @property
    def model_output_ids(self) -> tuple[Operand, ...]:
        return tuple(
            o for o, s in zip(self.output_ids, self.state_output_paths, strict=True) if s is None
        )


# Products of two arrays; a value computed with one of them is not "a parameter" any more.
_PRODUCTS = frozenset({"conv_general_dilated", "dot_general"})


def parameter_origins(program: TracedProgram) -> dict[int, Path]:
    """For every value computed from one parameter (and constants) only, that parameter's path.

    Shape ops, casts, reductions and elementwise arithmetic keep a parameter's identity: a
    kernel that is transposed, cast, or standardised (``(w - mean(w)) / std(w)``) is still that
    kernel, and the layer that uses it is still that kernel's layer. When several parameters
    meet (``v * g / |v|``), the one of the result's shape is the origin.
    """
    origin = {vid: path for path, vid in program.variable_inputs.items()}
    constant: set[int] = set()
    for eqn in program.eqns:
        values = [i for i in eqn.inputs if not isinstance(i, Const) and i not in constant]
        if not values:
            constant.update(eqn.outputs)
            continue
        if eqn.primitive in _PRODUCTS or any(v not in origin for v in values):
            continue
        shape = program.shapes[eqn.outputs[0]]
        same = [v for v in values if program.shapes[v] == shape]
        for out in eqn.outputs:
            origin[out] = origin[(same or values)[0]]
    return origin


def split_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits keyword arguments into array leaves (traced) and everything else (static)."""
    arrays, static = {}, {}
    for name, value in kwargs.items():
        leaves = jax.tree_util.tree_leaves(value)
        if leaves and all(isinstance(v, (jax.Array, np.ndarray)) for v in leaves):
            arrays[name] = value
        else:
            static[name] = value
    return arrays, static


def trace_apply(
    apply_fn: Callable[..., Any], variables: Any, x: Any, **kwargs: Any
) -> TracedProgram:
    """Traces `apply_fn(variables, x, **kwargs)` and inlines it into a flat program.

    Args:
      apply_fn: any function of (variables, x); for a flax module, `model.apply`.
      variables: the variables pytree (arrays or `jax.ShapeDtypeStruct`s).
      x: an example input (its shape and dtype are what matter).
      **kwargs: passed to `apply_fn`; array-valued ones (e.g. ``rngs``) are traced inputs.

    Returns:
      The traced program.
    """
    array_kwargs, static_kwargs = split_kwargs(kwargs)

    def fn(v, inp, kw):
        return apply_fn(v, inp, **kw, **static_kwargs)

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(variables, x, array_kwargs)
    var_leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    kw_leaves = jax.tree_util.tree_flatten_with_path(array_kwargs)[0]
    x_leaves = jax.tree_util.tree_leaves(x)
    if len(x_leaves) != 1:
        raise ValueError(
            f"The model input must be a single array, got a pytree with {len(x_leaves)} leaves; "
            "wrap a multi-input model so that apply_fn(variables, x) takes one array."
        )
    input_paths = (
        [path_of(p) for p, _ in var_leaves]
        + [("<input>",)]
        + [("<kwargs>",) + path_of(p) for p, _ in kw_leaves]
    )
    _, out_tree = jax.tree_util.tree_flatten(out_shape)
    state_paths = _state_output_paths(out_shape, static_kwargs.get("mutable", False))

    builder = _Flattener()
    builder.enter(())
    input_ids = tuple(builder.new_id(v) for v in closed.jaxpr.invars)
    for var, value in zip(closed.jaxpr.constvars, closed.consts, strict=True):
        builder.frame_consts[var] = Const(value)  # closed-over arrays (e.g. a mean/std)
    builder.walk(closed.jaxpr, ())
    builder.enter(())
    output_ids = tuple(builder.operand(v) for v in closed.jaxpr.outvars)
    return TracedProgram(
        closed_jaxpr=closed,
        input_paths=tuple(input_paths),
        input_ids=input_ids,
        output_ids=output_ids,
        output_tree=out_tree,
        state_output_paths=state_paths,
        eqns=tuple(builder.eqns),
        shapes=builder.shapes,
        dtypes=builder.dtypes,
        frame_ids=builder.frames,
        eqn_index=builder.eqn_index,
        variables_struct=jax.tree_util.tree_map(_struct, variables),
        input_struct=_struct(x_leaves[0]),
    )


def _struct(leaf: Any) -> jax.ShapeDtypeStruct:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype)


def _state_output_paths(out_shape: Any, mutable: Any) -> tuple[Path | None, ...]:
    """Marks outputs that are updated variables: flax's `(y, mutated_collections)` convention.

    Only a call made with flax's ``mutable=`` returns that pair; any other output, a
    `(logits, features)` tuple included, is the model's own and its channels are fixed.
    """
    if (
        mutable not in (False, None)
        and isinstance(out_shape, tuple)
        and len(out_shape) == 2
        and isinstance(out_shape[1], Mapping)
    ):
        y_count = len(jax.tree_util.tree_leaves(out_shape[0]))
        state = [path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(out_shape[1])[0]]
        return (None,) * y_count + tuple(state)
    return (None,) * len(jax.tree_util.tree_leaves(out_shape))


def sub_program(eqn: Any) -> Any | None:
    """The inlinable sub-jaxpr of a call-like equation, else None."""
    key = CALL_PRIMITIVES.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    return eqn.params[key]


def open_jaxpr(program: Any) -> tuple[Any, list[Any]]:
    """(jaxpr, consts) of a ClosedJaxpr or a plain Jaxpr."""
    if isinstance(program, jcore.ClosedJaxpr):
        return program.jaxpr, list(program.consts)
    return program, []


# Library code between the user's model and the primitive: a model line is the user's own.
_LIBRARY_PARTS = ("/flax/", "/optax/", "/jaxprune/", "/equinox/", "/haiku/")


def source_line(eqn: Any) -> str:
    """The innermost frame of the user's model code that made an equation, as
    'file:line (function)' (library frames such as flax's layers are skipped)."""
    try:
        from jax._src import source_info_util

        frames = list(source_info_util.user_frames(eqn.source_info.traceback))
        own = [f for f in frames if not any(part in f.file_name for part in _LIBRARY_PARTS)]
        frame = (own or frames or [None])[0]
        if frame is not None:
            return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    except Exception:  # source info is best effort, only for messages
        pass
    return "<unknown source>"


class _Flattener:
    def __init__(self) -> None:
        self.frames: dict[tuple[int, ...], dict[Hashable, int]] = {}
        self.consts: dict[tuple[int, ...], dict[Hashable, Const]] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.dtypes: dict[int, Any] = {}
        self.eqns: list[FlatEqn] = []
        self.eqn_index: dict[tuple[tuple[int, ...], int], int] = {}

    def enter(self, frame: tuple[int, ...]) -> None:
        self.ids = self.frames.setdefault(frame, {})
        self.frame_consts = self.consts.setdefault(frame, {})

    def new_id(self, var: Any) -> int:
        i = len(self.shapes)
        self.ids[var] = i
        self.shapes[i] = tuple(var.aval.shape)
        self.dtypes[i] = getattr(var.aval, "dtype", None)
        return i

    def operand(self, atom: Any) -> Operand:
        if isinstance(atom, jcore.Literal):
            return Const(atom.val)
        if atom in self.frame_consts:
            return self.frame_consts[atom]
        return self.ids[atom]

    def bind(self, inner: Any, outer: Operand) -> None:
        if isinstance(outer, Const):
            self.frame_consts[inner] = outer
        else:
            self.ids[inner] = outer

    def walk(self, jaxpr: Any, frame: tuple[int, ...], where: SourceLine | None = None) -> None:
        for k, eqn in enumerate(jaxpr.eqns):
            self.enter(frame)
            program = sub_program(eqn)
            line = SourceLine(eqn, where)
            if program is None:
                inputs = tuple(self.operand(a) for a in eqn.invars)
                outputs = tuple(self.new_id(v) for v in eqn.outvars)
                self.eqn_index[(frame, k)] = len(self.eqns)
                self.eqns.append(FlatEqn(eqn.primitive.name, eqn.params, inputs, outputs, line))
                continue
            operands = [self.operand(a) for a in eqn.invars]
            inner, consts = open_jaxpr(program)
            sub = frame + (k,)
            self.enter(sub)
            for var, value in zip(inner.constvars, consts, strict=True):
                self.frame_consts[var] = Const(value)
            for var, op in zip(inner.invars, operands, strict=True):
                self.bind(var, op)
            self.walk(inner, sub, line)
            self.enter(sub)
            results = [self.operand(v) for v in inner.outvars]
            self.enter(frame)
            for outer, result in zip(eqn.outvars, results, strict=True):
                if not isinstance(outer, jcore.DropVar):
                    self.bind(outer, result)


def iter_program_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a nested jaxpr, call-like ones included, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        program = sub_program(eqn)
        if program is not None:
            yield from iter_program_eqns(open_jaxpr(program)[0])
