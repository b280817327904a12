"""A linen module back for a pruned model, with no edit to its source.

The pruned program (`Pruned.apply_fn`) is the way to run a pruned model. Some users want a
`flax.linen` module again (to nest it, to call `apply` as before). `rebuild_linen(model, pruned)`
returns a subclass of the model's own class whose layers take their widths from the pruned
variables: while it runs, a `flax.linen.intercept_methods` interceptor sets each `Conv`/`Dense`'s
`features` (and a depthwise convolution's `feature_group_count`, a GroupNorm's `num_groups`)
from the arrays it is given, so the hard-coded ``nn.Conv(64)`` builds a 32-channel layer.

Re-running a model's code at other widths can take other paths (``if residual.shape !=
y.shape``), so the rebuilt module is checked once against the pruned program and refused if the
two differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import numpy as np

from jaxprune.surgery import Pruned, PruneError, first_difference, probe_input

_FEATURE_LAYERS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Dense)


def rebuild_linen(model: nn.Module, pruned: Pruned) -> nn.Module:
    """The model's class, resized to the pruned variables by intercepting its layers.

    Args:
      model: the linen module the graph was built from.
      pruned: the result of `jaxprune.prune` on its variables (with a graph from
        `channel_graph(model.apply, ...)`).

    Returns:
      A module with ``apply(pruned.variables, x, **kwargs)`` equal to the pruned program.

    Raises:
      PruneError: the rebuilt module computes something else (its code takes another path at
        the new widths, or sets a width the interceptor does not reach); use
        `pruned.apply_fn` instead.
    """
    if pruned.apply_fn is None:
        raise PruneError("rebuild_linen needs a Pruned from jaxprune.prune with its graph.")
    graph = pruned.apply_fn.graph
    group_sizes = _group_sizes(graph.variable_shapes)
    base = type(model)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__":
            _resize(module, args, group_sizes)
        return next_fun(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(interceptor):
            return base.__call__(self, *args, **kwargs)

    cls = type(f"Pruned{base.__name__}", (base,), {"__call__": __call__})
    fields = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.init and f.name not in ("parent", "name")
    }
    rebuilt = cls(**fields)
    _check(rebuilt, pruned)
    return rebuilt


def _group_sizes(shapes: Any) -> dict[tuple[str, ...], int]:
    """Per GroupNorm layer path (its "scale" or "bias"), the original channels per group are
    found at run time from `num_groups`; here only the layers' original widths are kept."""
    sizes = {}
    for path, shape in shapes.items():
        if path[0] == "params" and path[-1] in ("scale", "bias") and len(shape) == 1:
            sizes[tuple(path[1:-1])] = int(shape[0])
    return sizes


def _resize(module: nn.Module, args: tuple, group_sizes: dict) -> None:
    """Sets one layer's width fields from the arrays it is about to use."""
    path = tuple(module.scope.path) if module.scope is not None else ()
    if isinstance(module, _FEATURE_LAYERS) and module.has_variable("params", "kernel"):
        kernel = np.shape(module.get_variable("params", "kernel"))
        _force(module, "features", int(kernel[-1]))
        groups = getattr(module, "feature_group_count", 1)
        if groups > 1 and args:
            _force(module, "feature_group_count", int(np.shape(args[0])[-1] // kernel[-2]))
    elif isinstance(module, nn.GroupNorm) and module.num_groups and args:
        original = group_sizes.get(path)
        if original:
            per_group = original // module.num_groups
            _force(module, "num_groups", int(np.shape(args[0])[-1] // per_group))


def _force(module: nn.Module, name: str, value: Any) -> None:
    # Bound linen modules are frozen dataclasses; these are fresh clones made for this call.
    object.__setattr__(module, name, value)


def _check(rebuilt: nn.Module, pruned: Pruned) -> None:
    graph = pruned.apply_fn.graph
    x = probe_input(graph)
    kwargs = dict(graph.call_kwargs)
    try:
        ours = rebuilt.apply(pruned.variables, x, **kwargs)
    except Exception as e:
        raise PruneError(_refused(f"it fails at the new widths: {type(e).__name__}: {e}")) from e
    expected = pruned.apply_fn(pruned.variables, x, **kwargs)
    difference = first_difference(expected, ours)
    if difference is not None:
        raise PruneError(
            _refused(
                f"its output differs from the pruned program's ({difference}); its code takes "
                "another path at these widths (a branch on shapes) or uses a width jaxprune "
                "cannot set"
            )
        )


def _refused(why: str) -> str:
    return (
        f"The rebuilt linen module cannot be used: {why}. Run the pruned model with "
        "pruned.apply_fn(pruned.variables, x) instead; it needs no module."
    )
