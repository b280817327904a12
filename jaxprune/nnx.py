"""Flax NNX models: graph, prune and fine-tune an `nnx.Module` like a linen one.

An NNX module holds its arrays, so jaxprune sees it as a pure function of its state:
`as_apply(module)` gives ``(apply_fn, variables)`` where `variables` holds the module's state as
linen-like collections of plain nested dicts (``{"params": {"conv1": {"kernel": ...}},
"batch_stats": {"bn1": {"mean": ...}}}``, other variable types under ``"other"``) and
``apply_fn(variables, x, train=False, mutable=False, **kwargs)`` calls a copy of the module,
in its ``train()`` or ``eval()`` mode, holding those arrays (with ``mutable``, it also returns
the updated collections, as flax does). Group names are module paths ("conv1",
"blocks/0/conv"), as for linen.

`prune(module, graph, keep)` returns a *new*, smaller module (the input is not touched) whose
arrays are the pruned ones and whose attributes agree with them (`in_features`,
`out_features`, `kernel_shape`, `feature_group_count` of depthwise convolutions,
`num_features`, GroupNorm's `num_groups`). Because the new module runs the module's own Python
code at the new widths, it is checked once against the pruned program (which replays the
traced program and needs no code): a module whose code hard-codes a width elsewhere is refused,
with the pruned program as the way out. `prune_optimizer` prunes an `nnx.Optimizer`'s moments
alongside, so fine-tuning continues with the same momentum for the surviving channels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxprune.graph import ChannelGraph
from jaxprune.graph import channel_graph as _linen_graph
from jaxprune.surgery import (
    KeepIndices,
    Pruned,
    PruneError,
    axis_slices,
    first_difference,
    probe_input,
)
from jaxprune.surgery import prune as _prune_variables
from jaxprune.tree_paths import Path, path_of

# Collections by NNX variable type; every other type goes to "other".
_COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


def _split(module: nnx.Module) -> tuple[Any, dict[str, Any]]:
    """(graphdef, {collection: State}) with the collections that hold something."""
    filters = [f for _, f in _COLLECTIONS]
    graphdef, *states = nnx.split(module, *filters, ...)
    names = [n for n, _ in _COLLECTIONS] + ["other"]
    return graphdef, dict(zip(names, states, strict=True))


def _fresh(template: Any, values: Mapping[str, Any]) -> Any:
    """A new State like `template` holding `values` (a pure dict, possibly other shapes)."""
    state = jax.tree_util.tree_map(lambda leaf: leaf, template)  # new Variables, same types
    nnx.replace_by_pure_dict(state, values)
    return state


def as_apply(module: nnx.Module) -> tuple[Callable[..., Any], dict[str, Any]]:
    """An NNX module as ``(apply_fn, variables)``: a pure function and its state.

    Args:
      module: any `nnx.Module` (it is not modified).

    Returns:
      ``apply_fn(variables, x, train=False, mutable=False, **kwargs)``: calls a copy of
      `module` (in ``train()`` mode when `train`) holding `variables`, which may be smaller
      (pruned) arrays; with a list of collections as `mutable`, returns ``(output, updated
      collections)``. `variables` is ``{"params": ..., "batch_stats": ..., "other": ...}``
      (the collections the module has), each a pure dict.
    """
    eval_module, train_module = nnx.clone(module), nnx.clone(module)
    eval_module.eval()
    train_module.train()
    eval_def, templates = _split(eval_module)
    train_def, _ = _split(train_module)
    present = [n for n, st in templates.items() if jax.tree_util.tree_leaves(st)]
    variables = {n: nnx.to_pure_dict(templates[n]) for n in present}
    filters = dict(_COLLECTIONS)

    def apply_fn(
        variables: Mapping[str, Any],
        x: Any,
        *,
        train: bool = False,
        mutable: Any = False,
        rngs: Any = None,
        **kwargs: Any,
    ) -> Any:
        del rngs  # an NNX module draws from its own Rngs (in the "other" collection)
        states = [_fresh(templates[n], variables.get(n, {})) for n in templates]
        model = nnx.merge(train_def if train else eval_def, *states)
        output = model(x, **kwargs)
        if not mutable:
            return output
        names = present if mutable is True else list(mutable)
        updated = {}
        for name in names:
            if name == "other":
                state = nnx.state(model, nnx.Not(nnx.Any(*filters.values())))
            else:
                state = nnx.state(model, filters[name])
            updated[name] = nnx.to_pure_dict(state)
        return output, updated

    apply_fn.__name__ = type(module).__name__
    return apply_fn, variables


def channel_graph(
    module: nnx.Module, example_input: Any, *, strict: bool = True, **kwargs: Any
) -> ChannelGraph:
    """The channel graph of an NNX module (see `jaxprune.channel_graph`).

    Args:
      module: the model (traced in its ``eval()`` mode unless ``train=True`` is passed).
      example_input: an input of the shape the model is used with.
      strict: as for `jaxprune.channel_graph`.
      **kwargs: passed to the module's call (and ``train``, see `as_apply`).
    """
    apply_fn, variables = as_apply(module)
    return _linen_graph(apply_fn, variables, example_input, strict=strict, **kwargs)


def prune(
    module: nnx.Module, graph: ChannelGraph, keep: KeepIndices, *, verify: bool = True
) -> nnx.Module:
    """A new, smaller module without the removed channels (the input module is unchanged).

    Args:
      module: the model the graph was built from (`jaxprune.nnx.channel_graph`).
      graph: its channel graph.
      keep: per group, the channel indices to keep.
      verify: check the masked model, the pruned program and the new module against each
        other on a probe input.

    Returns:
      The pruned module, with its attributes (`in_features`, `out_features`, `kernel_shape`,
      `num_features`, ...) set to the new widths.

    Raises:
      PruneError: bad keep indices, or a new module that does not compute what the pruned
        program computes (its code uses a width jaxprune cannot change).
    """
    pruned = pruned_state(module, graph, keep, verify=verify)
    graphdef, templates = _split(module)
    states = [_fresh(templates[n], pruned.variables.get(n, {})) for n in templates]
    small = nnx.merge(graphdef, *states)
    _set_widths(module, small)
    if verify:
        _check_module(small, graph, pruned)
    return small


def pruned_state(
    module: nnx.Module, graph: ChannelGraph, keep: KeepIndices, *, verify: bool = True
) -> Pruned:
    """The pruned state (collections of pure dicts, as `as_apply`) and the pruned program of an
    NNX module, without building the new module: ``pruned.apply_fn(pruned.variables, x)``
    runs it."""
    _, variables = as_apply(module)
    return _prune_variables(variables, graph, keep, verify=verify)


def prune_optimizer(
    optimizer: nnx.Optimizer, graph: ChannelGraph, keep: KeepIndices, model: nnx.Module
) -> nnx.Optimizer:
    """An optimizer for the pruned `model` that continues `optimizer`'s state.

    Every moment shaped like a parameter (momentum, Adam's first and second moments) is sliced
    like that parameter; step counts are kept.

    Args:
      optimizer: the `nnx.Optimizer` of the unpruned model.
      graph: the unpruned model's channel graph.
      keep: the keep indices used for `prune`.
      model: the pruned module (`prune(module, graph, keep)`).

    Returns:
      A new `nnx.Optimizer` over `model`.
    """
    from jaxprune.surgery import validate_keep

    slices = axis_slices(graph, validate_keep(graph, keep))
    old = nnx.to_pure_dict(nnx.state(optimizer))
    flat = jax.tree_util.tree_flatten_with_path(old)[0]
    sliced_leaves = {}
    for key_path, leaf in flat:
        path = path_of(key_path)
        param = _param_suffix(path, np.shape(leaf), graph.variable_shapes)
        sliced_leaves[path] = slices[param].apply(leaf) if param in slices else leaf
    new_pure = jax.tree_util.tree_map_with_path(lambda p, _: sliced_leaves[path_of(p)], old)
    fresh = nnx.Optimizer(model, optimizer.tx, wrt=optimizer.wrt)
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, new_pure)
    nnx.update(fresh, state)
    return fresh


def _param_suffix(
    path: Path, shape: tuple[int, ...], variable_shapes: Mapping[Path, tuple[int, ...]]
) -> Path | None:
    """The parameter (``("params", *module path, name)``) whose path within its collection
    ends `path` and whose shape is `shape`, if any (an optimizer moment of that parameter)."""
    for n in range(len(path)):
        candidate = ("params", *path[n:])
        if variable_shapes.get(candidate) == tuple(shape):
            return candidate
    return None


def _set_widths(original: nnx.Module, small: nnx.Module) -> None:
    """Sets the width attributes of every layer of `small` from its arrays."""
    before = dict(nnx.iter_graph(original))
    for path, node in nnx.iter_graph(small):
        if not isinstance(node, nnx.Module):
            continue
        old = before.get(path)
        if isinstance(node, nnx.Conv | nnx.ConvTranspose):
            kernel = np.shape(node.kernel.get_value())
            groups = node.feature_group_count
            if old is not None and groups > 1 and groups == old.in_features:
                multiplier = old.out_features // old.in_features
                groups = kernel[-1] // max(1, multiplier)
                _set(node, "feature_group_count", groups)
            _set(node, "out_features", kernel[-1])
            _set(node, "in_features", kernel[-2] * groups)
            if hasattr(node, "kernel_shape"):
                _set(node, "kernel_shape", tuple(kernel))
        elif isinstance(node, nnx.Linear):
            kernel = np.shape(node.kernel.get_value())
            _set(node, "in_features", kernel[0])
            _set(node, "out_features", kernel[1])
        elif isinstance(node, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm | nnx.GroupNorm):
            features = _norm_features(node)
            if features is None:
                continue
            _set(node, "num_features", features)
            if isinstance(node, nnx.GroupNorm) and node.group_size:
                _set(node, "num_groups", features // node.group_size)


def _norm_features(node: nnx.Module) -> int | None:
    for name in ("scale", "bias", "mean", "var"):
        var = getattr(node, name, None)
        if isinstance(var, nnx.Variable) and var.get_value() is not None:
            return int(np.shape(var.get_value())[-1])
    return None


def _set(node: nnx.Module, name: str, value: Any) -> None:
    if hasattr(node, name):
        setattr(node, name, value)


def _check_module(small: nnx.Module, graph: ChannelGraph, pruned: Pruned) -> None:
    """Raises unless the new module computes what the pruned program computes."""
    x = probe_input(graph)
    kwargs = dict(graph.call_kwargs)
    # The program runs in inference mode (as_apply's default); so does a copy of the module:
    # a module in train mode would use batch statistics, and update its own running ones.
    probe = nnx.clone(small)
    probe.eval()
    try:
        ours = probe(x, **kwargs)
    except Exception as e:  # the module's code refuses its new widths
        why = f"it fails at the new widths: {type(e).__name__}: {e}"
        raise PruneError(_module_refused(why)) from e
    expected = pruned.apply_fn(pruned.variables, x, **kwargs)
    difference = first_difference(expected, ours)
    if difference is not None:
        raise PruneError(
            _module_refused(
                f"its output differs from the pruned program's ({difference}); its code takes "
                "another path at these widths (a branch on shapes) or uses a width jaxprune "
                "cannot set"
            )
        )


def _module_refused(why: str) -> str:
    return (
        f"The pruned NNX module cannot be used: {why}. Use the pruned program instead: "
        "pruned = jaxprune.nnx.pruned_state(module, graph, keep); "
        "pruned.apply_fn(pruned.variables, x)."
    )
