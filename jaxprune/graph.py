"""The channel graph: which channels of a model must be removed together, found in its jaxpr.

`channel_graph(apply_fn, variables, x)` traces the model and labels every axis of every value in
the program with the *channel space* it indexes. Labels are unified the way the program ties them
(an elementwise op ties its operands' axes, a conv ties its input feature axis to the kernel's
input axis, a flatten makes a (h, w, c) product, a concatenation a sum of parts), which is
first-order unification over axis terms. A class of unified labels that contains a kernel's output
axis is a prunable *channel group*: removing channel c of it means slicing index c from every
parameter axis in the class, and the matching rows of every composite axis (a dense layer after a
flatten reads channel c at rows (h * W + w) * C + c).

Classes that reach the model input or the model output (the logits) are fixed. An operation the
analysis does not understand taints the classes it touches; a tainted prunable group is an error
naming the primitive and the parameters involved, never a wrong group.

Nothing here knows about any particular model: the zoo and a user's own module go through the
same analysis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune.trace import Const, FlatEqn, Operand, Path, TracedProgram, trace_apply

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
WINDOW_REDUCTIONS = frozenset(
    "reduce_window_sum reduce_window_max reduce_window_min reduce_window".split()
)
# Ops whose outputs carry no channel identity (random numbers, index ranges, constants).
SOURCES = frozenset(
    """iota random_bits random_seed random_wrap random_unwrap random_fold_in random_split
    threefry2x32 rng_bit_generator rng_uniform""".split()
)
# Pure layout ops that a gate may be hoisted through (they only move channels around).
LAYOUT = frozenset({"reshape", "transpose", "concatenate", "squeeze", "expand_dims"})


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

    def unify(self, a: Term | None, b: Term | None, reason: str) -> Term | None:
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
        self.tag_taint(ra, reason + " (incompatible channel layouts)")
        self.tag_taint(rb, reason + " (incompatible channel layouts)")
        return ra

    def _move_tags(self, atom: int, term: Term) -> None:
        """An atom bound to a composite hands its tags to the composite's atoms."""
        tags = self.tags[atom]
        for a in self.atoms(term):
            self.tags[a].fixed |= tags.fixed
            self.tags[a].taints += tags.taints
            if tags.producers:
                self.tags[a].taints.append(
                    f"the output channels of {tags.producers[0][0]} are reshaped into several axes"
                )

    def owners(self, t: Term, target: int) -> np.ndarray:
        """For each index of axis `t`, the channel of atom class `target` it belongs to, or -1."""
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
        if self.channel_of_index is None:
            return np.asarray(keep_indices)
        kept = np.zeros(int(self.channel_of_index.max()) + 1, dtype=bool)
        kept[np.asarray(keep_indices)] = True
        owner = self.channel_of_index
        return np.nonzero((owner < 0) | kept[np.maximum(owner, 0)])[0]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Member):
            return NotImplemented
        same_map = (self.channel_of_index is None and other.channel_of_index is None) or (
            self.channel_of_index is not None
            and other.channel_of_index is not None
            and np.array_equal(self.channel_of_index, other.channel_of_index)
        )
        return self.path == other.path and self.axis == other.axis and same_map

    def __hash__(self) -> int:
        return hash((self.path, self.axis))


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
    """

    name: str
    size: int
    kind: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    members: tuple[Member, ...]

    def __repr__(self) -> str:
        return (
            f"ChannelGroup({self.name!r}, size={self.size}, kind={self.kind!r}, "
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


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGraph:
    """The prunable channel groups of a model, found in its traced program.

    Attributes:
      groups: every prunable group, in the order their first producer runs.
      fixed: layer outputs that cannot be pruned, with the reason (model input or output).
      variable_shapes: the shape of every variable the graph was built from, by path.
      gate_points: for each group, the values where consumers read it (for this trace).
      program: the traced program the graph was built from.
    """

    groups: tuple[ChannelGroup, ...]
    fixed: Mapping[str, str]
    variable_shapes: Mapping[Path, tuple[int, ...]]
    gate_points: Mapping[str, tuple[GatePoint, ...]]
    program: TracedProgram

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
            rows.append(
                (g.name, g.kind, str(g.size), ", ".join(g.producers), ", ".join(g.consumers))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.fixed:
            lines.append("fixed: " + ", ".join(f"{k} ({v})" for k, v in self.fixed.items()))
        return "\n".join(lines)


def layer_name(path: Path) -> str:
    """The module path of a parameter: ("params", "stage1", "conv1", "kernel") -> "stage1/conv1"."""
    inner = path[1:] if len(path) > 1 and path[0] in ("params", "batch_stats") else path
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
    return analyse(program, strict=strict)


def analyse(program: TracedProgram, *, strict: bool = True) -> ChannelGraph:
    """Builds the channel graph of an already traced program (see `channel_graph`)."""
    return _Analysis(program).run(strict)


# --------------------------------------------------------------------------------------------
# The analysis.


class _Analysis:
    def __init__(self, program: TracedProgram) -> None:
        self.program = program
        self.u = _Unifier()
        self.labels: dict[int, list[Term | None]] = {}
        self.param_origin: dict[int, Path] = {}
        self.producer_of: dict[int, FlatEqn] = {}
        self.uses: dict[int, int] = {}
        # (value id, axis, consumer layer) for every consumer read.
        self.reads: list[tuple[int, int, str]] = []
        # Program position of each layer's first use, and which layers are convolutions.
        self.first_index: dict[str, int] = {}
        self.conv_layers: set[str] = set()

    # -- labels of operands

    def fresh_labels(self, shape: Sequence[int]) -> list[Term | None]:
        return [self.u.fresh(n) if n != 1 else None for n in shape]

    def labels_of(self, op: Operand) -> list[Term | None]:
        if isinstance(op, Const):
            return [None] * len(op.shape)
        return self.labels[op]

    def shape_of(self, op: Operand) -> tuple[int, ...]:
        return op.shape if isinstance(op, Const) else self.program.shapes[op]

    def set_out(self, eqn: FlatEqn, labels: Iterable[Sequence[Term | None]]) -> None:
        for out, lab in zip(eqn.outputs, labels, strict=True):
            shape = self.program.shapes[out]
            self.labels[out] = [
                (lab_i if n != 1 else None) for lab_i, n in zip(lab, shape, strict=True)
            ]
            self.producer_of[out] = eqn

    def describe(self, eqn: FlatEqn) -> str:
        params = [
            layer_name(self.param_origin[i])
            for i in eqn.inputs
            if not isinstance(i, Const) and i in self.param_origin
        ]
        on = f" on parameters {params}" if params else ""
        where = "" if eqn.where.startswith("<") else f" at {eqn.where}"
        return f"'{eqn.primitive}'{on}{where}"

    # -- driver

    def run(self, strict: bool) -> ChannelGraph:
        prog = self.program
        for path, vid in prog.variable_inputs.items():
            self.labels[vid] = self.fresh_labels(prog.shapes[vid])
            self.param_origin[vid] = path
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
            self.visit(eqn)
        for o in prog.model_output_ids:
            if isinstance(o, Const):
                continue
            for t in self.labels[o]:
                for a in self.u.atoms(t) if t is not None else []:
                    self.u.tags[a].fixed.add("the model output")
        return self.build(strict)

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
                    label[ax] = self.u.unify(label[ax], labs[ax], self.describe(eqn))
        if eqn.primitive == "optimization_barrier":
            self.set_out(eqn, [self.labels_of(i) for i in eqn.inputs])
            return
        # Integer/bool ops (dropout masks, comparisons) keep whatever labels their inputs had.
        self.set_out(eqn, [label] * len(eqn.outputs))
        if eqn.primitive in ("convert_element_type", "copy", "copy_p") and not isinstance(
            eqn.inputs[0], Const
        ):
            self.inherit_origin(eqn)

    def inherit_origin(self, eqn: FlatEqn) -> None:
        src = eqn.inputs[0]
        if not isinstance(src, Const) and src in self.param_origin:
            self.param_origin[eqn.outputs[0]] = self.param_origin[src]

    def reduction(self, eqn: FlatEqn) -> None:
        axes = tuple(eqn.params.get("axes", ()))
        labs = self.labels_of(eqn.inputs[0])
        for ax in axes:
            t = labs[ax]
            if t is not None:
                # A reduction over channels (a sum over features, a layer norm over channels)
                # would see removed channels differently from masked ones.
                for a in self.u.atoms(t):
                    self.u.tags[a].taints.append(
                        f"a reduction over its channels ({self.describe(eqn)})"
                    )
        kept = [t for ax, t in enumerate(labs) if ax not in axes]
        self.set_out(eqn, [kept] * len(eqn.outputs))

    def window(self, eqn: FlatEqn) -> None:
        labs = self.labels_of(eqn.inputs[0])
        dims = eqn.params["window_dimensions"]
        strides = eqn.params["window_strides"]
        padding = eqn.params.get("padding", ((0, 0),) * len(dims))
        out: list[Term | None] = []
        for ax, t in enumerate(labs):
            passes = dims[ax] == 1 and strides[ax] == 1 and tuple(padding[ax]) == (0, 0)
            out.append(t if passes else self.u.fresh(self.program.shapes[eqn.outputs[0]][ax]))
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
        elif not isinstance(src, Const) and src in self.param_origin:
            self.param_origin[eqn.outputs[0]] = self.param_origin[src]

    def op_transpose(self, eqn: FlatEqn) -> None:
        labs = self.labels_of(eqn.inputs[0])
        self.set_out(eqn, [[labs[p] for p in eqn.params["permutation"]]])
        self.inherit_origin(eqn)

    def op_squeeze(self, eqn: FlatEqn) -> None:
        labs = self.labels_of(eqn.inputs[0])
        drop = {d % len(labs) for d in eqn.params["dimensions"]}
        self.set_out(eqn, [[t for ax, t in enumerate(labs) if ax not in drop]])
        self.inherit_origin(eqn)

    def op_expand_dims(self, eqn: FlatEqn) -> None:
        labs = list(self.labels_of(eqn.inputs[0]))
        for d in sorted(eqn.params["dimensions"]):
            labs.insert(d, None)
        self.set_out(eqn, [labs])
        self.inherit_origin(eqn)

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
                # Splitting an axis (e.g. channels into groups): bind it to a product of new
                # axes, and taint it if it turns out to be a prunable group.
                factors = tuple(self.u.fresh(n) for n in sizes)
                self.u.unify(in_terms[0], Product(factors), self.describe(eqn))
                for a in self.u.atoms(in_terms[0]):
                    if self.u.tags[a].producers:
                        self.u.tags[a].taints.append(
                            f"a reshape splitting it ({self.describe(eqn)})"
                        )
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
        self.inherit_origin(eqn)

    def op_concatenate(self, eqn: FlatEqn) -> None:
        dim = eqn.params["dimension"]
        out_shape = self.program.shapes[eqn.outputs[0]]
        label: list[Term | None] = [None] * len(out_shape)
        parts: list[Term] = []
        for i in eqn.inputs:
            shape, labs = self.shape_of(i), self.labels_of(i)
            for ax in range(len(out_shape)):
                if ax != dim and shape[ax] == out_shape[ax] and shape[ax] != 1:
                    label[ax] = self.u.unify(label[ax], labs[ax], self.describe(eqn))
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
            self.u.unify(lab_l[lhs_spec[1]], lab_r[rhs_spec[1]], self.describe(eqn))
            feat = lab_r[rhs_spec[0]]
        elif groups == c_in == c_out:
            # Depthwise: output channel c reads input channel c only; both are one group.
            feat = self.u.unify(lab_l[lhs_spec[1]], lab_r[rhs_spec[0]], self.describe(eqn))
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
            self.u.unify(lab_l[a], lab_r[b], self.describe(eqn))
        batch = [
            self.u.unify(lab_l[a], lab_r[b], self.describe(eqn))
            for a, b in zip(lb, rb, strict=True)
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

    # -- results

    def build(self, strict: bool) -> ChannelGraph:
        u, prog = self.u, self.program
        roots: dict[int, list[str]] = {}
        for root, tags in u.tags.items():
            if u.find(root) != root or not tags.producers:
                continue
            layers = dict.fromkeys(layer for layer, _ in tags.producers)
            roots[root] = sorted(layers, key=lambda layer: self.first_index[layer])

        fixed: dict[str, str] = {}
        usable: dict[int, str] = {}
        for root, producers in roots.items():
            tags = u.tags[root]
            name = producers[0]
            if tags.fixed:
                fixed[name] = " and ".join(sorted(tags.fixed))
                continue
            if tags.taints:
                if strict:
                    params = sorted({layer_name(p) for _, p in tags.producers})
                    raise GraphError(
                        f"Cannot prune the channels produced by {params}: they reach "
                        f"{tags.taints[0]}. Rewrite that part of the model with supported "
                        "operations, or pass strict=False to leave these channels unpruned."
                    )
                fixed[name] = "touched by " + tags.taints[0]
                continue
            usable[root] = name

        members: dict[int, list[Member]] = {r: [] for r in usable}
        for path, vid in prog.variable_inputs.items():
            for ax, t in enumerate(self.labels[vid]):
                if t is None:
                    continue
                term = u.resolve(t)
                for root in set(u.atoms(term)):
                    if root not in usable:
                        continue
                    owner = None if term == root else u.owners(term, root)
                    members[root].append(Member(path, ax, owner))

        consumers: dict[int, list[str]] = {r: [] for r in usable}
        points: dict[int, dict[int, GatePoint]] = {r: {} for r in usable}
        for vid, ax, layer in self.reads:
            term = self.labels[vid][ax]
            for root in set(u.atoms(term)):
                if root not in usable:
                    continue
                if layer not in consumers[root]:
                    consumers[root].append(layer)
                for point_vid, point_ax, owner in self.hoist(vid, ax, root):
                    points[root][point_vid] = GatePoint(
                        usable[root], point_vid, point_ax, owner, prog.shapes[point_vid]
                    )

        order = sorted(usable, key=lambda r: self.first_index[roots[r][0]])
        groups = []
        for root in order:
            producers = tuple(roots[root])
            groups.append(
                ChannelGroup(
                    name=usable[root],
                    size=u.size[root],
                    kind="conv" if self.conv_layers & set(producers) else "dense",
                    producers=producers,
                    consumers=tuple(consumers[root]),
                    members=tuple(members[root]),
                )
            )
        shapes = {p: prog.shapes[v] for p, v in prog.variable_inputs.items()}
        gate_points = {usable[r]: tuple(points[r].values()) for r in order}
        return ChannelGraph(tuple(groups), fixed, shapes, gate_points, prog)

    def hoist(self, vid: int, ax: int, root: int) -> list[tuple[int, int, np.ndarray | None]]:
        """Where to gate a read: the value itself, or, through a flatten or concatenation that
        is its only use, the earlier value that holds the channels as a plain axis."""
        term = self.u.resolve(self.labels[vid][ax])
        if term == root:
            return [(vid, ax, None)]
        eqn = self.producer_of.get(vid)
        if eqn is not None and eqn.primitive in ("reshape", "concatenate"):
            found = []
            for src in eqn.inputs:
                if isinstance(src, Const) or self.uses.get(src, 0) != 1:
                    continue
                for src_ax, t in enumerate(self.labels[src]):
                    if t is not None and root in self.u.atoms(t):
                        found += self.hoist(src, src_ax, root)
            if found:
                return found
        return [(vid, ax, self.u.owners(term, root))]
