"""The channel graph: which channels of a model must be removed together, found in its jaxpr.

`channel_graph(apply_fn, variables, x)` traces the model and labels every axis of every value in
the program with the *channel space* it indexes. Labels are unified the way the program ties them
(an elementwise op ties its operands' axes, a conv ties its input feature axis to the kernel's
input axis, a flatten makes a (h, w, c) product, a concatenation a sum of parts), which is
first-order unification over axis terms. A class of unified labels that contains a kernel's output
axis is a prunable *channel group*: removing channel c of it means slicing index c from every
parameter axis in the class, and the matching rows of every composite axis (a dense layer after a
flatten reads channel c at rows (h * W + w) * C + c).

What the analysis understands, beyond elementwise ops, convolutions and dense layers:

* constants: every use of a literal or closed-over array gets labels of its own, so an array
  sized by a channel count (``x * jnp.arange(C)``, a fixed mask) is sliced with the channels;
* reductions over channels (a LayerNorm's or RMSNorm's statistics, a weight-standardised
  kernel's mean over its input channels): a sum, max or min over the kept channels, and a mean
  divides by the number of *kept* channels (the count in its divisor is rewritten);
* a split of the channel axis into (groups, channels per group) with statistics per group, as
  in GroupNorm: such a group is pruned in whole blocks (`ChannelGroup.block`);
* kernels computed from parameters (weight standardisation, weight normalisation) are still
  their layer's kernel.

Classes that reach the model input or the model output are fixed. An operation the analysis does
not understand taints the classes it touches; a tainted prunable group is a `GraphError` naming
the operation and the model line, never a wrong group.

Nothing here knows about any particular model: the zoo and a user's own module go through the
same analysis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune.trace import (
    Const,
    FlatEqn,
    Operand,
    Path,
    TracedProgram,
    parameter_origins,
    trace_apply,
)

ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj copy copy_p
    cos cosh convert_element_type digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
    real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor
    stop_gradient sharding_constraint mesh_cast optimization_barrier shift_left
    shift_right_logical shift_right_arithmetic bitcast_convert_type population_count clz""".split()
)
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split()
)
# Reductions over channels whose result on the kept channels equals the masked model's.
CHANNEL_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min"})
WINDOW_REDUCTIONS = frozenset(
    "reduce_window_sum reduce_window_max reduce_window_min reduce_window".split()
)
# Ops whose outputs carry no channel identity (random numbers, index ranges). The pruned
# program computes them at the original shape and keeps the kept channels' entries.
SOURCES = frozenset(
    """iota random_bits random_seed random_wrap random_unwrap random_fold_in random_split
    threefry2x32 rng_bit_generator rng_uniform""".split()
)
# Pure layout ops that a gate may be hoisted through (they only move channels around).
LAYOUT = frozenset({"reshape", "transpose", "concatenate", "squeeze", "expand_dims"})
# Ops a channel sum passes through on its way to the division that makes it a mean.
_SUM_CARRIERS = frozenset(
    {"broadcast_in_dim", "reshape", "expand_dims", "squeeze", "transpose", "convert_element_type"}
)
# Scalar arithmetic a mean's divisor may go through (jnp.var divides by N - ddof).
_COUNT_ARITHMETIC = frozenset({"sub", "add", "convert_element_type", "max", "min", "mul"})


class GraphError(ValueError):
    """The model cannot be analysed or pruned as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Axis terms and their unification.


@dataclasses.dataclass(frozen=True)
class Product:
    """An axis that is the row-major product of factor axes (what a flatten makes)."""

    factors: tuple[int | Product | Concat, ...]


@dataclasses.dataclass(frozen=True)
class Concat:
    """An axis made of parts laid end to end (what a concatenation makes)."""

    parts: tuple[int | Product | Concat, ...]


Term = int | Product | Concat


@dataclasses.dataclass
class _Tags:
    producers: list[tuple[str, Path]] = dataclasses.field(default_factory=list)
    fixed: set[str] = dataclasses.field(default_factory=set)
    taints: list[str] = dataclasses.field(default_factory=list)


class _Unifier:
    """Union-find over atom labels, where an atom may be bound to a composite term."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.binding: dict[int, Term] = {}
        self.tags: dict[int, _Tags] = {}

    def fresh(self, size: int) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(size)
        self.tags[i] = _Tags()
        return i

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def resolve(self, t: Term) -> Term:
        """Follows bindings: a bound atom stands for its composite."""
        if isinstance(t, int):
            r = self.find(t)
            return self.resolve(self.binding[r]) if r in self.binding else r
        return t

    def canonical(self, t: Term) -> Term:
        """The term with every atom resolved, recursively (hashable, comparable)."""
        t = self.resolve(t)
        if isinstance(t, Product):
            return Product(tuple(self.canonical(f) for f in t.factors))
        if isinstance(t, Concat):
            return Concat(tuple(self.canonical(p) for p in t.parts))
        return t

    def term_size(self, t: Term) -> int:
        t = self.resolve(t)
        if isinstance(t, int):
            return self.size[t]
        if isinstance(t, Product):
            return math.prod(self.term_size(f) for f in t.factors)
        return sum(self.term_size(p) for p in t.parts)

    def atoms(self, t: Term) -> list[int]:
        """The root atoms a term is made of."""
        t = self.resolve(t)
        if isinstance(t, int):
            return [t]
        children = t.factors if isinstance(t, Product) else t.parts
        return [a for c in children for a in self.atoms(c)]

    def tag_taint(self, t: Term | None, reason: str) -> None:
        if t is None:
            return
        for a in self.atoms(t):
            self.tags[a].taints.append(reason)

    def unify(self, a: Term | None, b: Term | None, reason: object) -> Term | None:
        """Ties two terms; `reason` (formatted only if they turn out incompatible) names the
        operation that ties them."""
        if a is None:
            return b
        if b is None:
            return a
        ra, rb = self.resolve(a), self.resolve(b)
        if ra == rb:
            return ra
        if isinstance(ra, int) and isinstance(rb, int):
            self.parent[rb] = ra
            tags = self.tags.pop(rb)
            self.tags[ra].producers += tags.producers
            self.tags[ra].fixed |= tags.fixed
            self.tags[ra].taints += tags.taints
            return ra
        if isinstance(ra, int):
            self.binding[ra] = rb
            self._move_tags(ra, rb)
            return rb
        if isinstance(rb, int):
            self.binding[rb] = ra
            self._move_tags(rb, ra)
            return ra
        same_kind = type(ra) is type(rb)
        ca = ra.factors if isinstance(ra, Product) else ra.parts
        cb = rb.factors if isinstance(rb, Product) else rb.parts
        if (
            same_kind
            and len(ca) == len(cb)
            and all(self.term_size(x) == self.term_size(y) for x, y in zip(ca, cb, strict=True))
        ):
            for x, y in zip(ca, cb, strict=True):
                self.unify(x, y, reason)
            return ra
        self.tag_taint(ra, f"{reason} (incompatible channel layouts)")
        self.tag_taint(rb, f"{reason} (incompatible channel layouts)")
        return ra

    def _move_tags(self, atom: int, term: Term) -> None:
        """An atom bound to a composite hands its fixed marks and taints to the composite's
        atoms; its producers stay on it (the graph decides whether the split is prunable)."""
        tags = self.tags[atom]
        for a in self.atoms(term):
            self.tags[a].fixed |= tags.fixed
            self.tags[a].taints += tags.taints

    def owners(self, t: Term, target: int) -> np.ndarray:
        """For each index of axis `t`, the index of atom class `target` it belongs to, or -1."""
        t = self.resolve(t)
        if isinstance(t, int):
            n = self.size[t]
            return np.arange(n) if t == target else np.full(n, -1)
        if isinstance(t, Concat):
            return np.concatenate([self.owners(p, target) for p in t.parts])
        result = np.full((), -1)
        for f in t.factors:
            sub = self.owners(f, target)
            # Row-major: the new factor varies fastest.
            result = np.where(sub[None, :] >= 0, sub[None, :], result.reshape(-1)[:, None])
        return result.reshape(-1)


# --------------------------------------------------------------------------------------------
# The public graph.


@dataclasses.dataclass(frozen=True)
class Member:
    """One parameter axis that a channel group slices.

    Attributes:
      path: the variable's tree path, e.g. ("params", "conv2", "kernel").
      axis: the axis of that array indexed by the group's channels.
      channel_of_index: None when index i of the axis *is* channel i; otherwise, for every index
        of the axis, the group channel it belongs to (-1: not this group's), as for the rows of a
        dense kernel after a flatten.
    """

    path: Path
    axis: int
    channel_of_index: np.ndarray | None = None

    def keep_positions(self, keep_indices: np.ndarray) -> np.ndarray:
        """The indices along `axis` that survive when the group keeps `keep_indices`."""
        return kept_positions(self.channel_of_index, keep_indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Member):
            return NotImplemented
        return (
            self.path == other.path
            and self.axis == other.axis
            and _same_map(self.channel_of_index, other.channel_of_index)
        )

    def __hash__(self) -> int:
        return hash((self.path, self.axis))


def kept_positions(channel_of_index: np.ndarray | None, keep: np.ndarray) -> np.ndarray:
    """The positions of an axis that survive keeping channels `keep` of one group.

    Args:
      channel_of_index: None when position i is channel i; else each position's channel
        (-1: a position the group does not own, always kept).
      keep: the kept channels (sorted indices).
    """
    keep = np.asarray(keep)
    if channel_of_index is None:
        return keep
    owner = np.asarray(channel_of_index)
    kept = np.zeros(int(max(owner.max(initial=-1), keep.max(initial=-1))) + 1, dtype=bool)
    kept[keep] = True
    return np.nonzero((owner < 0) | kept[np.maximum(owner, 0)])[0]


def _same_map(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that must be removed together.

    Attributes:
      name: the module path of the first layer producing these channels ("conv1",
        "stage1/block0/conv2"); stable across traces and batch sizes.
      size: the number of channels.
      kind: "conv" if a convolution produces them, else "dense".
      producers: the layers whose output channels these are (several when a residual add or a
        depthwise conv ties them).
      consumers: the layers that read these channels as input features.
      members: every parameter axis sliced when a channel is removed.
      block: channels are removed in aligned blocks of this many (1 for most groups; the
        channels per group of a GroupNorm, whose statistics are per block).
    """

    name: str
    size: int
    kind: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    members: tuple[Member, ...]
    block: int = 1

    def __repr__(self) -> str:
        block = f", block={self.block}" if self.block != 1 else ""
        return (
            f"ChannelGroup({self.name!r}, size={self.size}{block}, kind={self.kind!r}, "
            f"producers={list(self.producers)}, consumers={list(self.consumers)}, "
            f"members={len(self.members)})"
        )


@dataclasses.dataclass(frozen=True)
class GatePoint:
    """A value of the traced program where a group's channels are read by their consumers.

    Masking the channels here (after normalisation and the nonlinearity, where a convolution
    or dense layer reads them) is exactly equivalent to removing them.

    Attributes:
      group: the group's name.
      value_id: the value's id in the traced program.
      axis: the axis of the value that holds the channels.
      channel_of_index: as for `Member`: None when index i is channel i.
      shape: the value's shape.
    """

    group: str
    value_id: int
    axis: int
    channel_of_index: np.ndarray | None
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class AxisRef:
    """One group's channels along one axis of a value of the traced program.

    Attributes:
      group: the group's name.
      channel_of_index: None when position i is channel i; else each position's channel
        (-1 where the group does not own the position).
    """

    group: str
    channel_of_index: np.ndarray | None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AxisRef):
            return NotImplemented
        return self.group == other.group and _same_map(
            self.channel_of_index, other.channel_of_index
        )

    def __hash__(self) -> int:
        return hash(self.group)


# Per axis of a value, the groups whose channels lie along it.
AxisRefs = Mapping[int, tuple[AxisRef, ...]]


@dataclasses.dataclass(frozen=True)
class ChannelReduction:
    """A reduction of the traced program over (some of) a group's channels.

    The masked model reduces the masked operand (zeros for a sum, -inf/+inf for a max/min), the
    pruned program the kept channels; both give the same result.

    Attributes:
      kind: "sum", "max" or "min".
      axes: the reduced axes of the operand that hold channels, with their groups.
      shape: the operand's shape.
    """

    kind: str
    axes: AxisRefs
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ChannelCount:
    """A literal that is the number of elements of a mean over channels (its divisor).

    A mean over channels is taken over the kept channels: the pruned program divides by the
    kept count, the masked model by the sum of the masks, and both agree.

    Attributes:
      inverse: the literal is 1 / count (a mean written as a product).
      other: the product of the reduced axes that hold no channels (e.g. height x width).
      axes: per reduced channel axis, its groups.
      sizes: the original size of each of those axes.
    """

    inverse: bool
    other: int
    axes: tuple[tuple[AxisRef, ...], ...]
    sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGraph:
    """The prunable channel groups of a model, found in its traced program.

    Attributes:
      groups: every prunable group, in the order their first producer runs.
      fixed: layer outputs that cannot be pruned, with the reason (model input or output).
      variable_shapes: the shape of every variable the graph was built from, by path.
      gate_points: for each group, the values where consumers read it (for this trace).
      program: the traced program the graph was built from.
      value_axes: for every value of the program that holds channels of a group, its axes.
      const_axes: the same for every constant operand, keyed by (equation index, operand).
      reductions: the equations that reduce over channels, by equation index.
      counts: the divisors of means over channels, keyed by (equation index, operand).
      apply_fn: the model function that was traced (None when built from a program alone).
      call_kwargs: the keyword arguments it was traced with.
    """

    groups: tuple[ChannelGroup, ...]
    fixed: Mapping[str, str]
    variable_shapes: Mapping[Path, tuple[int, ...]]
    gate_points: Mapping[str, tuple[GatePoint, ...]]
    program: TracedProgram
    value_axes: Mapping[int, AxisRefs] = dataclasses.field(default_factory=dict)
    const_axes: Mapping[tuple[int, int], AxisRefs] = dataclasses.field(default_factory=dict)
    reductions: Mapping[int, ChannelReduction] = dataclasses.field(default_factory=dict)
    counts: Mapping[tuple[int, int], ChannelCount] = dataclasses.field(default_factory=dict)
    apply_fn: Callable[..., Any] | None = None
    call_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    def __getitem__(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        if name in self.fixed:
            raise GraphError(
                f"{name!r} is not prunable: its channels are {self.fixed[name]}. "
                f"Prunable groups: {list(self.names)}."
            )
        raise GraphError(f"No channel group named {name!r}. Prunable groups: {list(self.names)}.")

    def __contains__(self, name: object) -> bool:
        return any(g.name == name for g in self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def summary(self) -> str:
        """A table of the groups: name, kind, channels, producers and consumers."""
        rows = [("group", "kind", "channels", "producers", "consumers")]
        for g in self.groups:
            size = str(g.size) if g.block == 1 else f"{g.size} (blocks of {g.block})"
            rows.append((g.name, g.kind, size, ", ".join(g.producers), ", ".join(g.consumers)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.fixed:
            lines.append("fixed: " + ", ".join(f"{k} ({v})" for k, v in self.fixed.items()))
        return "\n".join(lines)


_COLLECTIONS = ("params", "batch_stats")


def layer_name(path: Path) -> str:
    """The module path of a parameter: ("params", "stage1", "conv1", "kernel") -> "stage1/conv1".

    A linen variables tree starts with its collection ("params", "batch_stats"); an NNX state
    (as a pure dict) starts with the module path itself.
    """
    inner = path[1:] if len(path) > 1 and path[0] in _COLLECTIONS else path
    inner = inner[:-1] if len(inner) > 1 else inner
    return "/".join(inner)


def channel_graph(
    apply_fn: Callable[..., Any],
    variables: Any,
    example_input: Any,
    *,
    strict: bool = True,
    **kwargs: Any,
) -> ChannelGraph:
    """Finds the prunable channel groups of any `apply_fn(variables, x)`.

    Args:
      apply_fn: the model function, e.g. `model.apply` of a flax module. It is traced, not
        read, so a user's own model works as well as the zoo.
      variables: its variables (arrays or `jax.ShapeDtypeStruct`s).
      example_input: an input of the shape the model is used with (only shape and dtype matter).
      strict: if True, an operation the analysis does not understand on a prunable group's
        channels is an error; if False such groups are left out (reported in `fixed`).
      **kwargs: passed to `apply_fn` (e.g. ``train=False``).

    Returns:
      The channel graph.

    Raises:
      GraphError: an unsupported operation touches a prunable group's channels (strict).

    Example:
      >>> graph = channel_graph(model.apply, variables, jnp.zeros((1, 28, 28, 1)))
      >>> print(graph.summary())
    """
    program = trace_apply(apply_fn, variables, example_input, **kwargs)
    graph = analyse(program, strict=strict)
    return dataclasses.replace(graph, apply_fn=apply_fn, call_kwargs=dict(kwargs))


def analyse(program: TracedProgram, *, strict: bool = True) -> ChannelGraph:
    """Builds the channel graph of an already traced program (see `channel_graph`)."""
    return _Analysis(program).run(strict)


# --------------------------------------------------------------------------------------------
# The analysis.


@dataclasses.dataclass(eq=False)
class _Unit:
    """A prunable channel space: `atom` is what is removed; with `inner`, whole blocks of
    `inner`'s size are removed (a GroupNorm's groups)."""

    atom: int
    inner: int | None
    block: int
    roots: list[int]
    producers: list[tuple[str, Path]]


@dataclasses.dataclass
class _Reduction:
    index: int
    primitive: str
    operand: int
    axes: tuple[int, ...]
    eqn: FlatEqn

    @property
    def where(self) -> str:
        # Resolved only for a message: finding a source line walks a traceback.
        return where_text(self.eqn)


class _Described:
    """An equation's description, made on first formatting (it reads the source line)."""

    __slots__ = ("analysis", "eqn")

    def __init__(self, analysis: _Analysis, eqn: FlatEqn) -> None:
        self.analysis, self.eqn = analysis, eqn

    def __str__(self) -> str:
        return self.analysis.describe(self.eqn)


class _Analysis:
    def __init__(self, program: TracedProgram) -> None:
        self.program = program
        self.u = _Unifier()
        self.labels: dict[int, list[Term | None]] = {}
        self.param_origin: dict[int, Path] = {}
        self.producer_of: dict[int, FlatEqn] = {}
        self.producer_index: dict[int, int] = {}
        self.uses: dict[int, int] = {}
        # (value id, axis, consumer layer) for every consumer read.
        self.reads: list[tuple[int, int, str]] = []
        # Program position of each layer's first use, and which layers are convolutions.
        self.first_index: dict[str, int] = {}
        self.conv_layers: set[str] = set()
        # Constant operands get ids of their own (negative), one per use.
        self.const_shapes: dict[int, tuple[int, ...]] = {}
        self.const_values: dict[int, Const] = {}
        self.const_use: dict[int, tuple[int, int]] = {}
        # Reductions, pooling windows across an axis, and candidate means (a channel sum
        # divided by, or multiplied with, a scalar).
        self.reduction_list: list[_Reduction] = []
        self.windows: list[tuple[int, int, tuple[int, ...], FlatEqn]] = []
        self.sum_of: dict[int, int] = {}
        self.divisions: list[tuple[int, int, int, bool]] = []
        self.position = 0

    # -- labels of operands

    def fresh_labels(self, shape: Sequence[int]) -> list[Term | None]:
        return [self.u.fresh(n) if n != 1 else None for n in shape]

    def labels_of(self, op: Operand) -> list[Term | None]:
        if isinstance(op, Const):
            return [None] * len(op.shape)
        return self.labels[op]

    def shape_of(self, op: Operand) -> tuple[int, ...]:
        if isinstance(op, Const):
            return op.shape
        if op < 0:
            return self.const_shapes[op]
        return self.program.shapes[op]

    def set_out(self, eqn: FlatEqn, labels: Iterable[Sequence[Term | None]]) -> None:
        for out, lab in zip(eqn.outputs, labels, strict=True):
            shape = self.program.shapes[out]
            # Every axis longer than 1 gets a label, so it can be tied to channels later (a
            # broadcast constant that meets a channel axis is resized with it).
            self.labels[out] = [
                None if n == 1 else (lab_i if lab_i is not None else self.u.fresh(n))
                for lab_i, n in zip(lab, shape, strict=True)
            ]
            self.producer_of[out] = eqn
            self.producer_index[out] = self.position

    def reason(self, eqn: FlatEqn) -> _Described:
        """`describe(eqn)`, formatted only if a message needs it (most ties never do)."""
        return _Described(self, eqn)

    def describe(self, eqn: FlatEqn) -> str:
        params = [
            layer_name(self.param_origin[i])
            for i in eqn.inputs
            if not isinstance(i, Const) and i in self.param_origin
        ]
        on = f" on parameters {params}" if params else ""
        return f"'{eqn.primitive}'{on}{where_text(eqn)}"

    # -- driver

    def run(self, strict: bool) -> ChannelGraph:
        prog = self.program
        self.param_origin = parameter_origins(prog)
        for vid in prog.variable_inputs.values():
            self.labels[vid] = self.fresh_labels(prog.shapes[vid])
        for vid in prog.input_ids:
            if vid not in self.labels:
                self.labels[vid] = self.fresh_labels(prog.shapes[vid])
        for vid in prog.model_input_ids:
            for t in self.labels[vid]:
                if t is not None:
                    self.u.tags[self.u.find(t)].fixed.add("the model input")
        for k, eqn in enumerate(prog.eqns):
            self.position = k
            for i in eqn.inputs:
                if not isinstance(i, Const):
                    self.uses[i] = self.uses.get(i, 0) + 1
            self.visit(self.with_const_ids(k, eqn))
        for o in prog.model_output_ids:
            if isinstance(o, Const):
                continue
            for t in self.labels[o]:
                for a in self.u.atoms(t) if t is not None else []:
                    self.u.tags[a].fixed.add("the model output")
        return _Builder(self, strict).build()

    def with_const_ids(self, k: int, eqn: FlatEqn) -> FlatEqn:
        """The equation with each constant operand replaced by an id of its own use."""
        if not any(isinstance(i, Const) for i in eqn.inputs):
            return eqn
        inputs = []
        for j, op in enumerate(eqn.inputs):
            if isinstance(op, Const):
                cid = -(len(self.const_shapes) + 1)
                self.const_shapes[cid] = op.shape
                self.const_values[cid] = op
                self.const_use[cid] = (k, j)
                self.labels[cid] = self.fresh_labels(op.shape)
                op = cid
            inputs.append(op)
        return dataclasses.replace(eqn, inputs=tuple(inputs))

    def visit(self, eqn: FlatEqn) -> None:
        name = eqn.primitive
        handler = getattr(self, "op_" + name, None)
        if handler is not None:
            handler(eqn)
        elif name in ELEMENTWISE:
            self.elementwise(eqn)
        elif name in REDUCTIONS:
            self.reduction(eqn)
        elif name in WINDOW_REDUCTIONS:
            self.window(eqn)
        elif name in SOURCES:
            self.set_out(eqn, [self.fresh_labels(self.program.shapes[o]) for o in eqn.outputs])
        else:
            self.unsupported(eqn)
        if name in _SUM_CARRIERS and eqn.inputs and eqn.inputs[0] in self.sum_of:
            self.sum_of[eqn.outputs[0]] = self.sum_of[eqn.inputs[0]]

    def unsupported(self, eqn: FlatEqn, what: str | None = None) -> None:
        reason = what or f"unsupported operation {self.describe(eqn)}"
        for i in eqn.inputs:
            for t in self.labels_of(i):
                self.u.tag_taint(t, reason)
        outs = [self.fresh_labels(self.program.shapes[o]) for o in eqn.outputs]
        for lab in outs:
            for t in lab:
                self.u.tag_taint(t, reason)
        self.set_out(eqn, outs)

    def pass_through(self, eqn: FlatEqn, changed: Iterable[int], what: str) -> None:
        """An op that keeps every axis but `changed` (which it pads, slices or scans along)."""
        labs = self.labels_of(eqn.inputs[0])
        changed = set(changed)
        out: list[Term | None] = []
        shape = self.program.shapes[eqn.outputs[0]]
        for ax, t in enumerate(labs):
            if ax in changed:
                self.u.tag_taint(t, f"{what} along its channels ({self.describe(eqn)})")
                out.append(self.u.fresh(shape[ax]))
            else:
                out.append(t)
        self.set_out(eqn, [out] * len(eqn.outputs))

    # -- op families

    def elementwise(self, eqn: FlatEqn) -> None:
        out_shape = self.program.shapes[eqn.outputs[0]]
        rank = len(out_shape)
        label: list[Term | None] = [None] * rank
        for i in eqn.inputs:
            shape, labs = self.shape_of(i), self.labels_of(i)
            if len(shape) != rank:
                if len(shape) == 0:
                    continue
                return self.unsupported(eqn, f"rank-changing broadcast in {self.describe(eqn)}")
            for ax in range(rank):
                if shape[ax] == out_shape[ax] and shape[ax] != 1:
                    label[ax] = self.u.unify(label[ax], labs[ax], self.reason(eqn))
        if eqn.primitive == "optimization_barrier":
            self.set_out(eqn, [self.labels_of(i) for i in eqn.inputs])
            return
        # Integer/bool ops (dropout masks, comparisons) keep whatever labels their inputs had.
        self.set_out(eqn, [label] * len(eqn.outputs))
        self.note_division(eqn)

    def note_division(self, eqn: FlatEqn) -> None:
        """Records a channel sum divided by (or multiplied with) a scalar: a mean candidate."""
        ins = eqn.inputs
        if eqn.primitive == "div" and len(ins) == 2 and ins[0] in self.sum_of:
            self.divisions.append((self.position, self.sum_of[ins[0]], 1, False))
        elif eqn.primitive == "mul" and len(ins) == 2:
            for j in (0, 1):
                if ins[j] in self.sum_of and self.shape_of(ins[1 - j]) == ():
                    self.divisions.append((self.position, self.sum_of[ins[j]], 1 - j, True))

    def reduction(self, eqn: FlatEqn) -> None:
        axes = tuple(eqn.params.get("axes", ()))
        labs = self.labels_of(eqn.inputs[0])
        self.reduction_list.append(
            _Reduction(self.position, eqn.primitive, eqn.inputs[0], axes, eqn)
        )
        kept = [t for ax, t in enumerate(labs) if ax not in axes]
        self.set_out(eqn, [kept] * len(eqn.outputs))
        if eqn.primitive == "reduce_sum":
            self.sum_of[eqn.outputs[0]] = self.position

    def window(self, eqn: FlatEqn) -> None:
        labs = self.labels_of(eqn.inputs[0])
        dims = eqn.params["window_dimensions"]
        strides = eqn.params["window_strides"]
        padding = eqn.params.get("padding", ((0, 0),) * len(dims))
        out: list[Term | None] = []
        across = []
        for ax, t in enumerate(labs):
            passes = dims[ax] == 1 and strides[ax] == 1 and tuple(padding[ax]) == (0, 0)
            if not passes:
                across.append(ax)
            out.append(t if passes else self.u.fresh(self.program.shapes[eqn.outputs[0]][ax]))
        self.windows.append((self.position, eqn.inputs[0], tuple(across), eqn))
        n_out = len(eqn.outputs)
        self.set_out(eqn, [out] * n_out)

    def op_broadcast_in_dim(self, eqn: FlatEqn) -> None:
        src = eqn.inputs[0]
        out_shape = self.program.shapes[eqn.outputs[0]]
        in_shape, labs = self.shape_of(src), self.labels_of(src)
        out: list[Term | None] = [None] * len(out_shape)
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
            if in_shape[i] == out_shape[d]:
                out[d] = labs[i]
        self.set_out(eqn, [out])
        if len(eqn.inputs) > 1:  # dynamic shapes carry extra operands: not supported
            self.unsupported(eqn)

    def op_transpose(self, eqn: FlatEqn) -> None:
        labs = self.labels_of(eqn.inputs[0])
        self.set_out(eqn, [[labs[p] for p in eqn.params["permutation"]]])

    def op_squeeze(self, eqn: FlatEqn) -> None:
        labs = self.labels_of(eqn.inputs[0])
        drop = {d % len(labs) for d in eqn.params["dimensions"]}
        self.set_out(eqn, [[t for ax, t in enumerate(labs) if ax not in drop]])

    def op_expand_dims(self, eqn: FlatEqn) -> None:
        labs = list(self.labels_of(eqn.inputs[0]))
        for d in sorted(eqn.params["dimensions"]):
            labs.insert(d, None)
        self.set_out(eqn, [labs])

    def op_convert_element_type(self, eqn: FlatEqn) -> None:
        self.set_out(eqn, [self.labels_of(eqn.inputs[0])])

    op_copy = op_copy_p = op_convert_element_type

    def op_pad(self, eqn: FlatEqn) -> None:
        config = eqn.params["padding_config"]
        changed = [ax for ax, c in enumerate(config) if tuple(c) != (0, 0, 0)]
        self.pass_through(eqn, changed, "padding")

    def op_slice(self, eqn: FlatEqn) -> None:
        shape = self.shape_of(eqn.inputs[0])
        starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
        strides = eqn.params.get("strides") or (1,) * len(shape)
        changed = [
            ax for ax, n in enumerate(shape) if (starts[ax], limits[ax], strides[ax]) != (0, n, 1)
        ]
        self.pass_through(eqn, changed, "slicing")

    def op_dynamic_slice(self, eqn: FlatEqn) -> None:
        shape = self.shape_of(eqn.inputs[0])
        sizes = eqn.params["slice_sizes"]
        self.pass_through(eqn, [ax for ax, n in enumerate(shape) if sizes[ax] != n], "slicing")

    def op_cumsum(self, eqn: FlatEqn) -> None:
        self.pass_through(eqn, [eqn.params["axis"]], "a cumulative sum")

    op_cumprod = op_cummax = op_cummin = op_cumlogsumexp = op_cumsum

    def op_reshape(self, eqn: FlatEqn) -> None:
        src = eqn.inputs[0]
        if eqn.params.get("dimensions") not in (None, ()):
            return self.unsupported(eqn)
        in_shape, labs = self.shape_of(src), self.labels_of(src)
        out_shape = self.program.shapes[eqn.outputs[0]]
        out: list[Term | None] = [None] * len(out_shape)
        ins = [ax for ax, n in enumerate(in_shape) if n != 1]
        outs = [ax for ax, n in enumerate(out_shape) if n != 1]
        i = j = 0
        while i < len(ins) or j < len(outs):
            seg_in, seg_out = [ins[i]], [outs[j]]
            i, j = i + 1, j + 1
            p_in, p_out = in_shape[seg_in[0]], out_shape[seg_out[0]]
            while p_in != p_out:
                if p_in < p_out:
                    seg_in.append(ins[i])
                    p_in *= in_shape[ins[i]]
                    i += 1
                else:
                    seg_out.append(outs[j])
                    p_out *= out_shape[outs[j]]
                    j += 1
            in_terms = [labs[a] for a in seg_in]
            if len(seg_out) == 1:
                if len(seg_in) == 1:
                    out[seg_out[0]] = in_terms[0]
                elif any(t is not None for t in in_terms):
                    factors = tuple(
                        t if t is not None else self.u.fresh(in_shape[a])
                        for t, a in zip(in_terms, seg_in, strict=True)
                    )
                    out[seg_out[0]] = Product(factors)
                continue
            if all(t is None for t in in_terms):
                continue
            sizes = [out_shape[a] for a in seg_out]
            if len(seg_in) == 1:
                term = self.u.resolve(in_terms[0])
                if (
                    isinstance(term, Product)
                    and [self.u.term_size(f) for f in term.factors] == sizes
                ):
                    for a, f in zip(seg_out, term.factors, strict=True):
                        out[a] = f
                    continue
                # Splitting an axis (channels into groups, as GroupNorm does): bind it to a
                # product of new axes; whether that can be pruned is decided per group.
                factors = tuple(self.u.fresh(n) for n in sizes)
                self.u.unify(in_terms[0], Product(factors), self.reason(eqn))
                for a, f in zip(seg_out, factors, strict=True):
                    out[a] = f
                continue
            reason = f"a reshape regrouping several axes ({self.describe(eqn)})"
            for t in in_terms:
                self.u.tag_taint(t, reason)
            for a in seg_out:
                out[a] = self.u.fresh(out_shape[a])
                self.u.tag_taint(out[a], reason)
        self.set_out(eqn, [out])

    def op_concatenate(self, eqn: FlatEqn) -> None:
        dim = eqn.params["dimension"]
        out_shape = self.program.shapes[eqn.outputs[0]]
        label: list[Term | None] = [None] * len(out_shape)
        parts: list[Term] = []
        for i in eqn.inputs:
            shape, labs = self.shape_of(i), self.labels_of(i)
            for ax in range(len(out_shape)):
                if ax != dim and shape[ax] == out_shape[ax] and shape[ax] != 1:
                    label[ax] = self.u.unify(label[ax], labs[ax], self.reason(eqn))
            parts.append(labs[dim] if labs[dim] is not None else self.u.fresh(shape[dim]))
        label[dim] = Concat(tuple(parts))
        self.set_out(eqn, [label])

    def op_conv_general_dilated(self, eqn: FlatEqn) -> None:
        lhs, rhs = eqn.inputs
        dn = eqn.params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        groups = eqn.params["feature_group_count"]
        lab_l, lab_r = self.labels_of(lhs), self.labels_of(rhs)
        shape_l, shape_r = self.shape_of(lhs), self.shape_of(rhs)
        out_shape = self.program.shapes[eqn.outputs[0]]
        layer = self.layer_of(rhs)
        if eqn.params["batch_group_count"] != 1:
            return self.unsupported(eqn)
        out: list[Term | None] = [None] * len(out_shape)
        out[out_spec[0]] = lab_l[lhs_spec[0]]
        for ax in out_spec[2:]:
            out[ax] = self.u.fresh(out_shape[ax]) if out_shape[ax] != 1 else None
        c_in, c_out = shape_l[lhs_spec[1]], shape_r[rhs_spec[0]]
        if groups == 1:
            self.u.unify(lab_l[lhs_spec[1]], lab_r[rhs_spec[1]], self.reason(eqn))
            feat = lab_r[rhs_spec[0]]
        elif groups == c_in == c_out:
            # Depthwise: output channel c reads input channel c only; both are one group.
            feat = self.u.unify(lab_l[lhs_spec[1]], lab_r[rhs_spec[0]], self.reason(eqn))
        else:
            return self.unsupported(
                eqn,
                f"a grouped convolution with feature_group_count={groups} "
                f"({self.describe(eqn)}); only depthwise convolutions (groups == channels) "
                "can be pruned",
            )
        out[out_spec[1]] = feat
        if layer is not None:
            self.note_layer(layer, conv=True)
        if layer is not None and feat is not None:
            for a in self.u.atoms(feat):
                self.u.tags[a].producers.append((layer, self.param_origin[rhs]))
        if lab_l[lhs_spec[1]] is not None and layer is not None:
            self.reads.append((lhs, lhs_spec[1], layer))
        self.set_out(eqn, [out])

    def op_dot_general(self, eqn: FlatEqn) -> None:
        lhs, rhs = eqn.inputs
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lab_l, lab_r = self.labels_of(lhs), self.labels_of(rhs)
        for a, b in zip(lc, rc, strict=True):
            self.u.unify(lab_l[a], lab_r[b], self.reason(eqn))
        batch = [
            self.u.unify(lab_l[a], lab_r[b], self.reason(eqn)) for a, b in zip(lb, rb, strict=True)
        ]
        free_l = [t for ax, t in enumerate(lab_l) if ax not in lc and ax not in lb]
        free_r = [t for ax, t in enumerate(lab_r) if ax not in rc and ax not in rb]
        self.set_out(eqn, [batch + free_l + free_r])
        for kernel, data, free, contracted in ((rhs, lhs, free_r, lc), (lhs, rhs, free_l, rc)):
            layer = self.layer_of(kernel)
            if layer is None or self.layer_of(data) is not None:
                continue
            self.note_layer(layer, conv=False)
            for t in free:
                for a in self.u.atoms(t) if t is not None else []:
                    self.u.tags[a].producers.append((layer, self.param_origin[kernel]))
            for ax in contracted:
                if self.labels_of(data)[ax] is not None:
                    self.reads.append((data, ax, layer))

    def layer_of(self, op: Operand) -> str | None:
        if isinstance(op, Const) or op not in self.param_origin:
            return None
        return layer_name(self.param_origin[op])

    def note_layer(self, layer: str, conv: bool) -> None:
        self.first_index.setdefault(layer, self.position)
        if conv:
            self.conv_layers.add(layer)


def where_text(eqn: FlatEqn) -> str:
    """' at file:line (function)' for an equation with a known source line, else ''."""
    return "" if eqn.where.startswith("<") else f" at {eqn.where}"


class _Builder:
    """Turns the unified labels into groups, members, gate points and the maps the masked
    model and the pruned program need."""

    def __init__(self, analysis: _Analysis, strict: bool) -> None:
        self.a = analysis
        self.u = analysis.u
        self.strict = strict
        self.fixed: dict[str, str] = {}
        self.owner_cache: dict[tuple[Term, int], np.ndarray | None] = {}

    # -- units: which atoms are prunable, and in which blocks

    def find_units(self) -> dict[int, _Unit]:
        u = self.u
        units: dict[int, _Unit] = {}
        for root, tags in u.tags.items():
            if u.find(root) != root or not tags.producers:
                continue
            layers = [layer for layer, _ in tags.producers]
            term = u.resolve(root)
            if isinstance(term, int):
                atom, inner = term, None
            else:
                atom, inner = self.block_split(term, layers)
                if atom is None:
                    continue
            unit = units.get(atom)
            if unit is None:
                block = 1 if inner is None else u.size[inner]
                unit = units[atom] = _Unit(atom, inner, block, [], [])
            elif unit.inner != inner:
                self.refuse(
                    layers,
                    "are split into channel blocks in two different ways",
                )
                continue
            unit.roots.append(root)
            unit.producers += tags.producers
        # An atom that is both a block index and a layer's own output is not a channel space.
        return {a: unit for a, unit in units.items() if not self.conflicting(unit, units)}

    def block_split(self, term: Term, layers: list[str]) -> tuple[int | None, int | None]:
        """(block atom, within-block atom) of a producer's output split by a reshape into
        (blocks, channels per block); (None, None) after refusing any other split."""
        u = self.u
        if isinstance(term, Product) and len(term.factors) == 2:
            outer, inner = (u.resolve(f) for f in term.factors)
            if isinstance(outer, int) and isinstance(inner, int) and not u.tags[inner].producers:
                return outer, inner
        kind = "split into several axes" if isinstance(term, Product) else "laid out in parts"
        self.refuse(
            layers,
            f"are {kind} ({self.describe_term(term)}); only a split into "
            "(groups, channels per group), as GroupNorm does, can be pruned (in whole groups)",
        )
        return None, None

    def conflicting(self, unit: _Unit, units: dict[int, _Unit]) -> bool:
        if unit.inner is None:
            return False
        if unit.inner in units or any(
            other.inner == unit.atom for other in units.values() if other is not unit
        ):
            self.refuse(
                [layer for layer, _ in unit.producers],
                "are split into blocks that are also another layer's channels",
            )
            return True
        return False

    def describe_term(self, term: Term) -> str:
        t = self.u.resolve(term)
        if isinstance(t, int):
            return str(self.u.size[t])
        if isinstance(t, Product):
            return " x ".join(self.describe_term(f) for f in t.factors)
        return " + ".join(self.describe_term(p) for p in t.parts)

    def refuse(self, layers: Sequence[str], why: str) -> None:
        names = sorted(dict.fromkeys(layers), key=lambda n: self.a.first_index.get(n, 0))
        if self.strict:
            raise GraphError(
                f"Cannot prune the channels produced by {names}: they {why}. Rewrite that part "
                "of the model with supported operations, or pass strict=False to leave these "
                "channels unpruned."
            )
        self.fixed[names[0]] = f"not prunable: they {why}"

    def tags_of(self, unit: _Unit) -> tuple[set[str], list[str]]:
        atoms = [unit.atom, *unit.roots] + ([unit.inner] if unit.inner is not None else [])
        fixed: set[str] = set()
        taints: list[str] = []
        for a in dict.fromkeys(atoms):
            tags = self.u.tags.get(a)
            if tags is not None:
                fixed |= tags.fixed
                taints += tags.taints
        return fixed, taints

    # -- channel positions along any axis

    def unit_owners(self, term: Term, unit: _Unit) -> tuple[bool, np.ndarray | None]:
        """Whether an axis holds channels of `unit`, and each position's channel (None when
        position i is channel i)."""
        key = (self.u.canonical(term), unit.atom)
        cached = self.owner_cache.get(key)
        if cached is not None:
            return cached
        block = self.u.owners(term, unit.atom)
        if unit.inner is None:
            owners = block
        else:
            within = self.u.owners(term, unit.inner)
            owners = np.where(block >= 0, block * unit.block + np.maximum(within, 0), -1)
        size = unit.block * self.u.size[unit.atom]
        identity = owners.size == size and np.array_equal(owners, np.arange(size))
        result = (bool((owners >= 0).any()), None if identity else owners)
        self.owner_cache[key] = result
        return result

    def axis_refs(self, term: Term | None) -> tuple[AxisRef, ...]:
        if term is None:
            return ()
        units = dict.fromkeys(
            self.unit_of_atom[a] for a in self.u.atoms(term) if a in self.unit_of_atom
        )
        refs = []
        for unit in units:
            present, owners = self.unit_owners(term, unit)
            if present:
                refs.append(AxisRef(self.names[unit.atom], owners))
        return tuple(refs)

    def value_refs(self, vid: int) -> dict[int, tuple[AxisRef, ...]]:
        found = {}
        for ax, t in enumerate(self.a.labels[vid]):
            refs = self.axis_refs(t)
            if refs:
                found[ax] = refs
        return found

    def set_usable(self, units: dict[int, _Unit], usable: dict[int, str]) -> None:
        """The units that are groups now, by atom (block and within-block atoms) and name."""
        self.names = usable
        self.atom_of = {name: atom for atom, name in usable.items()}
        self.unit_of_atom = {}
        for atom in usable:
            unit = units[atom]
            self.unit_of_atom[atom] = unit
            if unit.inner is not None:
                self.unit_of_atom[unit.inner] = unit

    # -- the build

    def build(self) -> ChannelGraph:
        a, u, prog = self.a, self.u, self.a.program
        units = self.find_units()
        usable: dict[int, str] = {}
        for atom, unit in units.items():
            layers = dict.fromkeys(layer for layer, _ in unit.producers)
            name = sorted(layers, key=lambda layer: a.first_index[layer])[0]
            fixed, taints = self.tags_of(unit)
            if fixed:
                self.fixed[name] = " and ".join(sorted(fixed))
                continue
            if taints:
                if self.strict:
                    params = sorted({layer_name(p) for _, p in unit.producers})
                    raise GraphError(
                        f"Cannot prune the channels produced by {params}: they reach "
                        f"{taints[0]}. Rewrite that part of the model with supported "
                        "operations, or pass strict=False to leave these channels unpruned."
                    )
                self.fixed[name] = "touched by " + taints[0]
                continue
            usable[atom] = name
        self.check_reductions(units, usable)

        members: dict[int, list[Member]] = {r: [] for r in usable}
        for path, vid in prog.variable_inputs.items():
            for ax, t in enumerate(a.labels[vid]):
                for ref in self.axis_refs(t):
                    atom = self.atom_of[ref.group]
                    members[atom].append(Member(path, ax, ref.channel_of_index))

        consumers: dict[int, list[str]] = {r: [] for r in usable}
        points: dict[int, dict[int, GatePoint]] = {r: {} for r in usable}
        for vid, ax, layer in a.reads:
            term = a.labels[vid][ax]
            for ref in self.axis_refs(term):
                atom = self.atom_of[ref.group]
                if layer not in consumers[atom]:
                    consumers[atom].append(layer)
                for point_vid, point_ax, owner in self.hoist(vid, ax, units[atom]):
                    points[atom][point_vid] = GatePoint(
                        ref.group, point_vid, point_ax, owner, prog.shapes[point_vid]
                    )

        order = sorted(usable, key=lambda r: a.first_index[self.first_producer(units[r])])
        groups = []
        for atom in order:
            unit = units[atom]
            producers = tuple(
                sorted(
                    dict.fromkeys(layer for layer, _ in unit.producers),
                    key=lambda layer: a.first_index[layer],
                )
            )
            if not members[atom]:
                raise GraphError(
                    f"The channels produced by {list(producers)} have no parameter to slice; "
                    "this is a jaxprune bug, please report it with the model."
                )
            groups.append(
                ChannelGroup(
                    name=usable[atom],
                    size=unit.block * u.size[atom],
                    kind="conv" if a.conv_layers & set(producers) else "dense",
                    producers=producers,
                    consumers=tuple(consumers[atom]),
                    members=tuple(members[atom]),
                    block=unit.block,
                )
            )
        shapes = {p: prog.shapes[v] for p, v in prog.variable_inputs.items()}
        gate_points = {usable[r]: tuple(points[r].values()) for r in order}
        value_axes = {}
        const_axes = {}
        for vid in a.labels:
            refs = self.value_refs(vid)
            if not refs:
                continue
            if vid >= 0:
                value_axes[vid] = refs
            else:
                const_axes[a.const_use[vid]] = refs
        return ChannelGraph(
            tuple(groups),
            self.fixed,
            shapes,
            gate_points,
            prog,
            value_axes=value_axes,
            const_axes=const_axes,
            reductions=self.reductions,
            counts=self.counts(),
        )

    def first_producer(self, unit: _Unit) -> str:
        return min((layer for layer, _ in unit.producers), key=lambda n: self.a.first_index[n])

    def check_reductions(self, units: dict[int, _Unit], usable: dict[int, str]) -> None:
        """Reductions and pooling windows over channels: a sum, max or min is understood (over
        the kept channels); anything else over a group's channels is refused."""
        self.reductions: dict[int, ChannelReduction] = {}
        while True:
            self.set_usable(units, usable)
            bad = self.unsupported_reductions()
            if not bad:
                break
            for atom, why in bad.items():
                unit = units[atom]
                layers = [layer for layer, _ in unit.producers]
                if self.strict:
                    self.refuse(layers, why)
                self.fixed[usable.pop(atom)] = f"touched by {why}"
        for red in self.a.reduction_list:
            axes = {ax: refs for ax in red.axes if (refs := self.operand_refs(red.operand, ax))}
            if axes:
                self.reductions[red.index] = ChannelReduction(
                    red.primitive.removeprefix("reduce_"), axes, self.a.shape_of(red.operand)
                )

    def operand_refs(self, op: int, ax: int) -> tuple[AxisRef, ...]:
        return self.axis_refs(self.a.labels_of(op)[ax])

    def unsupported_reductions(self) -> dict[int, str]:
        bad: dict[int, str] = {}
        for red in self.a.reduction_list:
            if red.primitive in CHANNEL_REDUCTIONS:
                continue
            for ax in red.axes:
                for ref in self.operand_refs(red.operand, ax):
                    bad.setdefault(
                        self.atom_of[ref.group],
                        f"reach a '{red.primitive}' over their channels{red.where}, whose "
                        "result changes meaning when channels are removed",
                    )
        for _, op, across, eqn in self.a.windows:
            for ax in across:
                for ref in self.operand_refs(op, ax):
                    bad.setdefault(
                        self.atom_of[ref.group],
                        f"reach a pooling window across their channels{where_text(eqn)}",
                    )
        return bad

    def counts(self) -> dict[tuple[int, int], ChannelCount]:
        """The literal divisor of every mean over channels, found behind its division."""
        a = self.a
        found: dict[tuple[int, int], ChannelCount] = {}
        by_index = {red.index: red for red in a.reduction_list}
        for div_index, red_index, scalar_pos, inverse in a.divisions:
            reduction = self.reductions.get(red_index)
            if reduction is None or reduction.kind != "sum":
                continue
            red = by_index[red_index]
            shape = a.shape_of(red.operand)
            total = math.prod(shape[ax] for ax in red.axes)
            other = math.prod(shape[ax] for ax in red.axes if ax not in reduction.axes)
            spec = ChannelCount(
                inverse,
                other,
                tuple(reduction.axes[ax] for ax in sorted(reduction.axes)),
                tuple(shape[ax] for ax in sorted(reduction.axes)),
            )
            eqn = a.program.eqns[div_index]
            target = 1.0 / total if inverse else float(total)
            site = self.find_literal(div_index, eqn, scalar_pos, target, depth=3)
            if site is not None:
                found[site] = spec
        return found

    def find_literal(
        self, index: int, eqn: FlatEqn, pos: int, target: float, depth: int
    ) -> tuple[int, int] | None:
        """(equation, operand) of the literal equal to `target` that operand `pos` of `eqn`
        is computed from through scalar arithmetic (N, or N - ddof), if any."""
        op = eqn.inputs[pos]
        if isinstance(op, Const):
            value = np.asarray(op.value)
            if value.shape == () and np.isclose(float(value), target, rtol=1e-6, atol=0):
                return (index, pos)
            return None
        if depth == 0 or self.a.program.shapes[op] != () or op not in self.a.producer_index:
            return None
        p_index = self.a.producer_index[op]
        producer = self.a.program.eqns[p_index]
        if producer.primitive not in _COUNT_ARITHMETIC:
            return None
        for j in range(len(producer.inputs)):
            site = self.find_literal(p_index, producer, j, target, depth - 1)
            if site is not None:
                return site
        return None

    def hoist(self, vid: int, ax: int, unit: _Unit) -> list[tuple[int, int, np.ndarray | None]]:
        """Where to gate a read: the value itself, or, through a flatten or concatenation that
        is its only use, the earlier value that holds the channels as a plain axis."""
        a = self.a
        term = self.u.resolve(a.labels[vid][ax])
        _, owners = self.unit_owners(term, unit)
        if owners is None:
            return [(vid, ax, None)]
        eqn = a.producer_of.get(vid)
        if eqn is not None and eqn.primitive in ("reshape", "concatenate"):
            found = []
            for src in eqn.inputs:
                if isinstance(src, Const) or a.uses.get(src, 0) != 1:
                    continue
                for src_ax, t in enumerate(a.labels[src]):
                    if t is not None and unit.atom in self.u.atoms(t):
                        found += self.hoist(src, src_ax, unit)
            if found:
                return found
        return [(vid, ax, owners)]
