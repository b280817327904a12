"""The cost of a model: MACs, FLOPs and parameters per layer, counted from its traced program.

`count` traces ``apply_fn(variables, x)`` (see `jaxprune.trace`) and reads the cost of every
convolution and every parameterised matrix product from the equations themselves, so it works
on any Flax model a user writes, with no table per architecture. It needs only shapes: the
variables may be `jax.ShapeDtypeStruct`s (from `jax.eval_shape`), so VGG-16 at 224x224 is counted
without allocating it. `latency` times the compiled call on the real arrays.

Conventions (per example, as papers report them; the traced batch, ``x.shape[0]``, is divided
out):

* MACs (multiply-accumulates): conv ``H_out * W_out * C_out * (C_in / groups) * K_h * K_w``;
  dense ``I * O``.
* FLOPs, as Molchanov et al. 2017 (arXiv 1611.06440, appendix "FLOPs computation") count them:
  conv ``2 * H * W * (C_in * K^2 + 1) * C_out`` and dense ``(2 * I - 1) * O``. The paper's formula
  has the ``+ 1`` (the bias add) whether or not a layer has a bias, so it is counted for every
  conv here too; the dense formula has no bias term, and none is added. H and W are the positions
  the sliding window visits, i.e. the output's spatial size (the paper says "input feature map";
  the two agree for its stride-1, same-padded layers, and only the output size is right for a
  strided conv). Grouped convs use ``C_in / groups`` in place of ``C_in``.
* Parameters: per layer, its kernel plus its bias if any. The total is every leaf of the
  ``"params"`` collection (so BatchNorm scale and bias are included), and no other collection
  (``"batch_stats"`` running means and variances are state, not parameters).

Element-wise work (activations, BatchNorm, pooling, residual adds) is not counted, as in the
literature's figures.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxprune.trace import (
    Const,
    FlatEqn,
    Operand,
    Path,
    TracedProgram,
    parameter_origins,
    split_kwargs,
    trace_apply,
)

if TYPE_CHECKING:
    from jaxprune.graph import ChannelGroup

# Primitives that only move or re-type values: a kernel read through them is still the kernel.
SHAPE_ONLY_PRIMITIVES = frozenset(
    {"convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze", "copy"}
)

PARAMS_COLLECTION = "params"

Number = int | float


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """The cost of one convolution or dense layer, per example.

    Attributes:
      name: the kernel's module path joined with "/", without the leading ``"params"`` and the
        trailing ``"kernel"`` (e.g. ``"stage1/block0/conv1"``); a kernel used more than once gets
        ``"#2"``, ``"#3"``, ... on its later uses; a layer whose kernel is not a parameter is
        named ``"<conv 0>"``, ``"<dense 1>"``, ...
      kind: ``"conv"`` or ``"dense"``.
      in_channels: input channels (conv, all groups together) or input features (dense).
      out_channels: output channels or features.
      kernel_size: spatial size of the kernel; ``()`` for dense.
      groups: ``feature_group_count`` of a conv (depthwise: ``in_channels``); 1 for dense.
      out_spatial: spatial size of the output per example (dense: the non-feature axes per
        example, ``()`` for a plain ``(batch, features)`` layer).
      macs: multiply-accumulates per example.
      flops: FLOPs per example, Molchanov et al. 2017's convention.
      params: parameters of the kernel and of its bias.
      kernel_path: full tree path of the kernel, joined with "/"; None if it is no parameter.
      bias_path: full tree path of the bias, or None.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    groups: int
    out_spatial: tuple[int, ...]
    macs: Number
    flops: Number
    params: int
    kernel_path: str | None
    bias_path: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the row (tuples become lists)."""
        row = dataclasses.asdict(self)
        row["kernel_size"] = list(self.kernel_size)
        row["out_spatial"] = list(self.out_spatial)
        return row


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Per-layer and total cost of a model, per example.

    Attributes:
      layers: one row per conv / dense layer, in program order.
      macs: total MACs of the layers.
      flops: total FLOPs of the layers.
      params: every leaf of the ``"params"`` collection (BatchNorm scale and bias included,
        ``"batch_stats"`` excluded); every variable leaf if the variables have no collections.
      input_shape: the traced input's shape; its leading axis is the batch divided out.
    """

    layers: tuple[LayerCost, ...]
    macs: Number
    flops: Number
    params: int
    input_shape: tuple[int, ...]

    def layer(self, name: str) -> LayerCost:
        """Returns the row called `name`.

        Raises:
          KeyError: no layer has that name; the message lists the names there are.
        """
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r}; layers are: {', '.join(r.name for r in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: totals, input shape and the list of layer rows."""
        return {
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "input_shape": list(self.input_shape),
            "layers": [row.to_dict() for row in self.layers],
        }

    def format_table(self) -> str:
        """A fixed-width text table of the layers and the totals."""
        header = ("layer", "kind", "in", "out", "kernel", "groups", "output", "MACs", "FLOPs")
        rows = [header + ("params",)]
        for r in self.layers:
            rows.append(
                (
                    r.name,
                    r.kind,
                    str(r.in_channels),
                    str(r.out_channels),
                    _dims(r.kernel_size),
                    str(r.groups),
                    _dims(r.out_spatial),
                    _si(r.macs),
                    _si(r.flops),
                    _si(r.params),
                )
            )
        rows.append(("total", "", "", "", "", "", "", _si(self.macs), _si(self.flops)))
        rows[-1] += (_si(self.params),)
        lines = _align(rows, right_from=2)
        lines.append(
            "per example; params = every leaf of the 'params' collection "
            "(BatchNorm scale/bias included, batch_stats excluded)"
        )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Latency:
    """Wall time of one compiled call, in seconds.

    Attributes:
      median: median over the timed calls.
      p10: 10th percentile.
      p90: 90th percentile.
      times: every timed call, in order.
      batch_size: leading axis of the input that was timed.
    """

    median: float
    p10: float
    p90: float
    times: tuple[float, ...]
    batch_size: int


def count(apply_fn: Callable[..., Any], variables: Any, x: Any, **kwargs: Any) -> CostReport:
    """Counts the MACs, FLOPs and parameters of `apply_fn(variables, x, **kwargs)`.

    Every ``conv_general_dilated`` is a conv row and every ``dot_general`` with an operand read
    from a parameter leaf (through shape-only ops: convert_element_type, reshape, transpose,
    broadcast_in_dim, squeeze, copy) is a dense row. A conv costs ``H_out * W_out * C_out *
    (C_in / groups) * K_h * K_w`` MACs and ``2 * H_out * W_out * (C_in / groups * K_h * K_w + 1) *
    C_out`` FLOPs; a dense layer ``I * O`` MACs and ``(2 * I - 1) * O`` FLOPs (Molchanov et al.
    2017; see the module docstring for why the conv's ``+ 1`` is always there). A layer's bias is
    the parameter added to its output, else the sibling ``"bias"`` leaf of its kernel's module.

    Args:
      apply_fn: any function of (variables, x); for a flax module, `model.apply`.
      variables: the variables pytree, as arrays or `jax.ShapeDtypeStruct`s.
      x: an example input, batch first (an array or a `jax.ShapeDtypeStruct`); the counts are
        divided by ``x.shape[0]``.
      **kwargs: passed to `apply_fn` (e.g. ``train=False``).

    Returns:
      The per-example cost report.

    Raises:
      ValueError: `x` has no batch axis, or its batch is empty.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((2, 4))
      >>> count(model.apply, model.init(jax.random.key(0), x), x).macs
      12
    """
    shape = tuple(getattr(x, "shape", ()))
    if not shape or shape[0] < 1:
        raise ValueError(
            f"count needs an input with a leading batch axis of size >= 1, got shape {shape}; "
            "add one, e.g. x[None]."
        )
    program = trace_apply(apply_fn, variables, x, **kwargs)
    layers = _layers(program, batch=shape[0])
    return CostReport(
        layers=layers,
        macs=sum(r.macs for r in layers),
        flops=sum(r.flops for r in layers),
        params=_total_params(program),
        input_shape=shape,
    )


def channel_cost(report: CostReport, group: ChannelGroup, measure: str = "flops") -> float:
    """What one channel of a group costs per example: its share of the layers it touches.

    ``sum_{p in producers} C_p / out_p + sum_{q in consumers} C_q * k_q / in_q``, with C a
    layer's cost in `report`, out_p its output channels, in_q its input features and k_q how
    many of them one channel of the group feeds (1 for a conv, H * W for a dense layer after a
    flatten). A layer that both produces and consumes the group (a depthwise conv) counts once,
    as a producer. Every term is linear in the group's width, so removing n channels saves n
    times this.

    Args:
      report: `count` of the model the group belongs to.
      group: a `jaxprune.graph.ChannelGroup` of that model.
      measure: "flops" or "macs".

    Returns:
      The cost of one channel (a float: a dense consumer's share may be fractional).

    Raises:
      ValueError: an unknown measure.
    """
    if measure not in ("flops", "macs"):
        raise ValueError(f"measure must be 'flops' or 'macs', got {measure!r}.")

    def rows(layer: str) -> list[LayerCost]:
        return [r for r in report.layers if r.name == layer or r.name.startswith(layer + "#")]

    total = 0.0
    for layer in group.producers:
        total += sum(getattr(r, measure) / r.out_channels for r in rows(layer))
    for layer in group.consumers:
        if layer in group.producers:
            continue
        kernel = ("params", *layer.split("/"), "kernel")
        fed = 1
        for member in group.members:
            if member.path == kernel and member.channel_of_index is not None:
                fed = int(np.sum(member.channel_of_index == 0))
        total += sum(getattr(r, measure) * fed / r.in_channels for r in rows(layer))
    return float(total)


def compare(before: CostReport, after: CostReport) -> str:
    """A before/after table: per-layer channels and MACs, and the totals.

    Layers are matched by name; one that exists on a single side shows "-" on the other.
    A ratio is ``before / after`` (how many times smaller the layer or model got; "4.00x" means a
    quarter of the cost is left).

    Args:
      before: the report of the original model.
      after: the report of the pruned model.

    Returns:
      The table as text.
    """
    after_rows = {r.name: r for r in after.layers}
    before_rows = {r.name: r for r in before.layers}
    names = [r.name for r in before.layers]
    names += [r.name for r in after.layers if r.name not in before_rows]
    rows = [("layer", "channels before", "channels after", "MACs before", "MACs after", "ratio")]
    for name in names:
        b, a = before_rows.get(name), after_rows.get(name)
        rows.append(
            (
                name,
                f"{b.in_channels}->{b.out_channels}" if b else "-",
                f"{a.in_channels}->{a.out_channels}" if a else "-",
                _si(b.macs) if b else "-",
                _si(a.macs) if a else "-",
                _ratio(b.macs, a.macs) if a and b else "-",
            )
        )
    for label, b_total, a_total in (
        ("total MACs", before.macs, after.macs),
        ("total FLOPs", before.flops, after.flops),
        ("total params", before.params, after.params),
    ):
        rows.append((label, "", "", _si(b_total), _si(a_total), _ratio(b_total, a_total)))
    return "\n".join(_align(rows, right_from=1))


def latency(
    apply_fn: Callable[..., Any],
    variables: Any,
    x: Any,
    *,
    warmup: int = 3,
    repeats: int = 20,
    **kwargs: Any,
) -> Latency:
    """Times the jitted call `apply_fn(variables, x, **kwargs)`.

    The call is compiled and run `warmup` times untimed (the first run compiles), then run
    `repeats` times, each waited for with `jax.block_until_ready`.

    Args:
      apply_fn: any function of (variables, x).
      variables: the variables pytree, as arrays (shapes alone cannot be timed).
      x: the input batch.
      warmup: untimed calls first; 0 puts the compilation into the first timing.
      repeats: timed calls, at least 1.
      **kwargs: passed to `apply_fn`; array-valued ones are traced, the rest are static.

    Returns:
      Median, 10th and 90th percentile wall time of one call, in seconds.

    Raises:
      ValueError: `repeats` < 1, `warmup` < 0, or a variable or `x` is a shape, not an array.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"latency needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}."
        )
    leaves = jax.tree_util.tree_leaves((variables, x))
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        raise ValueError(
            "latency runs the model, so variables and x must be arrays, not "
            "jax.ShapeDtypeStruct; initialise the model (model.init) before timing it."
        )
    array_kwargs, static_kwargs = split_kwargs(kwargs)

    @jax.jit
    def call(v: Any, inp: Any, kw: Mapping[str, Any]) -> Any:
        return apply_fn(v, inp, **kw, **static_kwargs)

    for _ in range(warmup):
        jax.block_until_ready(call(variables, x, array_kwargs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call(variables, x, array_kwargs))
        times.append(time.perf_counter() - start)
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    shape = tuple(getattr(x, "shape", ()))
    return Latency(
        median=float(median),
        p10=float(p10),
        p90=float(p90),
        times=tuple(times),
        batch_size=int(shape[0]) if shape else 1,
    )


# --- reading the program ---------------------------------------------------------------------


def _param_paths(program: TracedProgram) -> dict[int, Path]:
    """Value id -> path of every parameter leaf (the "params" collection, if there is one)."""
    variables = program.variable_inputs
    if any(path[0] == PARAMS_COLLECTION for path in variables):
        return {i: p for p, i in variables.items() if p[0] == PARAMS_COLLECTION}
    # A plain pytree of weights has no collections: every leaf is a parameter.
    return {i: p for p, i in variables.items()}


def _total_params(program: TracedProgram) -> int:
    return sum(math.prod(program.shapes[i]) for i in _param_paths(program))


def _layers(program: TracedProgram, batch: int) -> tuple[LayerCost, ...]:
    params = _param_paths(program)
    origins = parameter_origins(program)
    consumers: dict[int, list[FlatEqn]] = {}
    for eqn in program.eqns:
        for op in eqn.inputs:
            if not isinstance(op, Const):
                consumers.setdefault(op, []).append(eqn)

    def source(op: Operand) -> Path | None:
        # The parameter a value is computed from (a kernel, transposed or standardised).
        return None if isinstance(op, Const) else origins.get(op)

    rows: list[LayerCost] = []
    uses: dict[str, int] = {}
    unnamed = 0
    for eqn in program.eqns:
        if eqn.primitive == "conv_general_dilated":
            kernel_op = eqn.inputs[1]
            kind = "conv"
        elif eqn.primitive == "dot_general":
            lhs_path, rhs_path = source(eqn.inputs[0]), source(eqn.inputs[1])
            if lhs_path is None and rhs_path is None:
                continue  # a product of two activations (e.g. attention) is no layer
            # Flax's Dense puts the kernel on the right; a left kernel is read the same way.
            kernel_is_rhs = rhs_path is not None
            kernel_op = eqn.inputs[1] if kernel_is_rhs else eqn.inputs[0]
            kind = "dense"
        else:
            continue
        kernel_path = source(kernel_op)
        if kernel_path is None:
            name = f"<{kind} {unnamed}>"
            unnamed += 1
        else:
            name = _layer_name(kernel_path)
            uses[name] = uses.get(name, 0) + 1
            if uses[name] > 1:
                name = f"{name}#{uses[name]}"
        if kind == "conv":
            geometry, total_macs, total_flops = _conv_geometry(program, eqn)
        else:
            geometry, total_macs, total_flops = _dense_geometry(program, eqn, kernel_is_rhs)
        bias_path = _find_bias(
            program,
            eqn.outputs[0],
            geometry["out_channels"],
            consumers,
            source,
            kernel_path,
            params,
        )
        # A fixed (non-parameter) kernel, e.g. a blur filter, adds no parameters.
        layer_params = 0 if kernel_path is None else math.prod(_operand_shape(program, kernel_op))
        if bias_path is not None:
            layer_params += math.prod(_shape_of_path(program, bias_path))
        rows.append(
            LayerCost(
                name=name,
                kind=kind,
                macs=_per_example(total_macs, batch),
                flops=_per_example(total_flops, batch),
                params=int(layer_params),
                kernel_path="/".join(kernel_path) if kernel_path else None,
                bias_path="/".join(bias_path) if bias_path else None,
                **geometry,
            )
        )
    return tuple(rows)


def _conv_geometry(program: TracedProgram, eqn: FlatEqn) -> tuple[dict[str, Any], int, int]:
    """A conv's LayerCost fields, and its MACs and FLOPs over the whole traced batch."""
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    rhs_shape = _operand_shape(program, eqn.inputs[1])
    out_shape = program.shapes[eqn.outputs[0]]
    groups = int(eqn.params.get("feature_group_count", 1))
    in_per_group = rhs_shape[rhs_spec[1]]
    kernel_size = tuple(int(rhs_shape[d]) for d in rhs_spec[2:])
    out_channels = int(rhs_shape[rhs_spec[0]])
    fan_in = in_per_group * math.prod(kernel_size)
    out_positions = math.prod(out_shape) // out_shape[out_spec[1]]
    fields = {
        "in_channels": int(in_per_group * groups),
        "out_channels": out_channels,
        "kernel_size": kernel_size,
        "groups": groups,
        "out_spatial": tuple(int(out_shape[d]) for d in out_spec[2:]),
    }
    # Counted from the output, so strides, padding and batch groups are all accounted for.
    macs = out_positions * out_channels * fan_in
    flops = 2 * out_positions * (fan_in + 1) * out_channels
    return fields, macs, flops


def _dense_geometry(
    program: TracedProgram, eqn: FlatEqn, kernel_is_rhs: bool
) -> tuple[dict[str, Any], int, int]:
    """A dense layer's LayerCost fields, and its MACs and FLOPs over the whole traced batch."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    data_op, kernel_op = eqn.inputs if kernel_is_rhs else eqn.inputs[::-1]
    data_shape = _operand_shape(program, data_op)
    kernel_shape = _operand_shape(program, kernel_op)
    data_contract, data_batch = (
        (lhs_contract, lhs_batch) if kernel_is_rhs else (rhs_contract, rhs_batch)
    )
    kernel_contract, kernel_batch = (
        (rhs_contract, rhs_batch) if kernel_is_rhs else (lhs_contract, lhs_batch)
    )
    in_features = math.prod(data_shape[d] for d in data_contract)
    out_features = math.prod(
        n for d, n in enumerate(kernel_shape) if d not in kernel_contract and d not in kernel_batch
    )
    out_shape = program.shapes[eqn.outputs[0]]
    rows = math.prod(out_shape) // max(out_features, 1)
    data_free = [
        int(n) for d, n in enumerate(data_shape) if d not in data_contract and d not in data_batch
    ]
    fields = {
        "in_channels": int(in_features),
        "out_channels": int(out_features),
        "kernel_size": (),
        "groups": 1,
        # Free data axes after the batch one, e.g. tokens of a (batch, tokens, features) input.
        "out_spatial": tuple(data_free[1:]) if kernel_is_rhs else tuple(data_free[:-1]),
    }
    macs = rows * out_features * in_features
    flops = rows * out_features * (2 * in_features - 1)
    return fields, macs, flops


def _find_bias(
    program: TracedProgram,
    out_id: int,
    out_channels: int,
    consumers: Mapping[int, Sequence[FlatEqn]],
    source: Callable[[Operand], Path | None],
    kernel_path: Path | None,
    params: Mapping[int, Path],
) -> Path | None:
    """The parameter added to a layer's output, else the sibling "bias" leaf of its kernel."""
    frontier = [out_id]
    while frontier:
        value = frontier.pop()
        for eqn in consumers.get(value, ()):
            if eqn.primitive == "add":
                for op in eqn.inputs:
                    if op == value:
                        continue
                    path = source(op)
                    # One value per output channel: a bias, not e.g. a second activation.
                    if (
                        path is not None
                        and math.prod(_shape_of_path(program, path)) == out_channels
                    ):
                        return path
            elif eqn.primitive == "convert_element_type":
                frontier.append(eqn.outputs[0])  # a dtype cast before the bias add
    if kernel_path is not None:
        sibling = kernel_path[:-1] + ("bias",)
        if sibling in params.values() and sibling != kernel_path:
            return sibling
    return None


def _operand_shape(program: TracedProgram, op: Operand) -> tuple[int, ...]:
    return op.shape if isinstance(op, Const) else tuple(program.shapes[op])


def _shape_of_path(program: TracedProgram, path: Path) -> tuple[int, ...]:
    return tuple(program.shapes[program.variable_inputs[path]])


def _layer_name(kernel_path: Path) -> str:
    parts = list(kernel_path)
    if parts and parts[0] == PARAMS_COLLECTION:
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == "kernel":
        parts = parts[:-1]
    return "/".join(parts)


def _per_example(total: int, batch: int) -> Number:
    return total // batch if total % batch == 0 else total / batch


# --- text ------------------------------------------------------------------------------------


def _si(n: Number) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def _ratio(before: Number, after: Number) -> str:
    return f"{before / after:.2f}x" if after else "-"


def _dims(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims) if dims else "-"


def _align(rows: Sequence[Sequence[str]], right_from: int) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if c >= right_from else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
