"""The model of iterative pruning between two physical shrinks, its cost, and the shrink.

Iterative pruning removes channels by masking them: the gates of `jaxprune.gates` are traced
inputs, so the train step, the criterion and the evaluation compile once while the masks
change. Every `shrink_every` steps the masked channels are removed physically. The physical
model is always the *original* model's pruned program at the cumulative keep
(`jaxprune.program.PrunedProgram`, the original traced program replayed at the kept widths): no
module is rebuilt, and keeps compose against the original graph.

A group shrunk to one channel has no channel axis left in a graph traced on the pruned program
(an axis of size 1 reads as a broadcast), so it is absent from `Network.graph`. Such a group can
lose nothing more (a group is never emptied); its keep lives on in `Network.keep`, which holds
every group of the original graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxprune import cost, criteria, train
from jaxprune.gates import gated_apply_fn
from jaxprune.graph import ChannelGraph, channel_graph
from jaxprune.model import Model
from jaxprune.program import PrunedProgram
from jaxprune.surgery import compose_keep, keep_to_masks, masks_to_keep, prune
from jaxprune.tree_paths import path_of

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """The model between two physical shrinks: one set of shapes, one set of compiled programs.

    Attributes:
      keep: per group of the original graph, the original channels physically present.
      program: the apply function at those widths (the original's when nothing was removed,
        else its pruned program).
      variables: the shapes and dtypes of `program`'s variables (`jax.ShapeDtypeStruct`s).
      graph: the channel graph of `program` (groups of one channel are absent, see above).
      model: the user's model running `program` with masks read from ``variables["masks"]``
        (for `train.TrainState`).
      context: the criteria's scoring context (the evaluation call of `program`).
    """

    keep: dict[str, np.ndarray]
    program: Callable[..., Any]
    variables: PyTree
    graph: ChannelGraph
    model: Model
    context: criteria.ScoringContext

    def full_masks(self) -> dict[str, jax.Array]:
        """Masks that keep every channel of `graph`.

        Returns:
          Per group of `graph`, a float32 vector of ones.
        """
        return keep_to_masks(self.graph, {})

    def alive(self, masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The original channels that `masks` keep.

        Args:
          masks: per group of `graph`, 1 for kept and 0 for removed channels.

        Returns:
          Per group of the original graph, the indices of its channels left.
        """
        return {
            name: kept[np.asarray(masks[name]) != 0] if name in masks else kept
            for name, kept in self.keep.items()
        }


def structs(variables: PyTree) -> PyTree:
    """The shapes and dtypes of a variables tree.

    Args:
      variables: arrays (or anything with a shape and dtype).

    Returns:
      The same tree of `jax.ShapeDtypeStruct`s.
    """
    return jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), variables)


def program_at(
    original: ChannelGraph, base: PyTree, keep: Mapping[str, np.ndarray]
) -> tuple[PrunedProgram, PyTree]:
    """The original model's pruned program at `keep` and the shapes of its variables.

    Args:
      original: the original model's channel graph.
      base: the shapes of the original variables (`structs`).
      keep: per group, the original channels kept.

    Returns:
      ``(program, variable shapes)``.
    """
    program = PrunedProgram(original, keep)
    shapes = program.variable_shapes
    return program, jax.tree_util.tree_map_with_path(
        lambda p, s: jax.ShapeDtypeStruct(shapes[path_of(p)], s.dtype), base
    )


def make_network(
    model: Model, original: ChannelGraph, base: PyTree, keep: Mapping[str, np.ndarray]
) -> Network:
    """Everything one shrink period compiles against, for the original channels in `keep`.

    Args:
      model: the user's model (its calls and example input).
      original: its channel graph.
      base: the shapes of its variables (`structs`).
      keep: per group of `original`, the original channels physically present.

    Returns:
      The network. It depends only on its arguments, so a resumed run rebuilds the very
      programs an uninterrupted one runs.
    """
    keep = {name: np.asarray(kept, np.int64) for name, kept in keep.items()}
    if all(keep[g.name].size == g.size for g in original.groups):
        program, variables, graph = model.apply_fn, base, original
    else:
        program, variables = program_at(original, base, keep)
        graph = channel_graph(program, variables, model.example_input, **model.eval_kwargs)
    return Network(
        keep=keep,
        program=program,
        variables=variables,
        graph=graph,
        model=model.with_apply_fn(gated_apply_fn(program, graph)),
        context=criteria.ScoringContext(program, graph, apply_kwargs=model.eval_kwargs),
    )


def plain_variables(state: train.TrainState) -> dict[str, PyTree]:
    """The variables of a train state, without its masks.

    Args:
      state: a train state.

    Returns:
      ``{"params": ..., **every other collection}``.
    """
    return {"params": state.params, **state.collections}


def shrink(
    state: train.TrainState, network: Network, model: Model, original: ChannelGraph, base: PyTree
) -> tuple[train.TrainState, Network]:
    """Removes the masked channels physically, with their optimizer momentum.

    Args:
      state: a train state running ``network.model`` whose masks mark the removed channels.
      network: the current network.
      model, original, base: the user's model, its graph and variable shapes (`make_network`).

    Returns:
      The state of the smaller model (all masks 1, momentum of the surviving channels kept,
      step and rng unchanged) and its network.
    """
    local = masks_to_keep(state.masks)
    # prune's self-check (masked model == pruned program on a probe) runs op by op, compiling
    # each operation at the new shapes: once per run is enough, at the shrink of the original
    # model, since later shrinks replay the same program.
    pruned = prune(
        plain_variables(state),
        network.graph,
        local,
        opt_state=state.opt_state,
        optimizer=state.tx,
        verify=network.program is model.apply_fn,
    )
    smaller = make_network(model, original, base, compose_keep(network.keep, local))
    new_state = state.replace(
        params=pruned.variables["params"],
        collections={k: v for k, v in pruned.variables.items() if k != "params"},
        opt_state=pruned.opt_state,
        model=smaller.model,
        masks=smaller.full_masks(),
    )
    return new_state, smaller


def masked_cost(
    model: Model, original: ChannelGraph, base: PyTree, alive: Mapping[str, np.ndarray]
) -> cost.CostReport:
    """The cost of the model with only the `alive` original channels, from shapes alone.

    Args:
      model: the user's model; original: its graph; base: its variable shapes.
      alive: per group, the original channels left (e.g. `Network.alive(masks)`).

    Returns:
      The per-example cost report of that model's pruned program.
    """
    program, variables = program_at(original, base, alive)
    return cost.count(program, variables, model.example_input, **model.eval_kwargs)


def flops_per_channel(
    report: cost.CostReport, original: ChannelGraph, names: Iterable[str]
) -> dict[str, float]:
    """What one channel of each named group costs in the model of `report`, in MFLOPs.

    The formula of `criteria.flops_per_channel`; the groups of the original graph name the
    layers, the report gives their current widths.

    Args:
      report: the cost report of the (masked) model, e.g. from `masked_cost`.
      original: the original model's graph.
      names: the groups to price.

    Returns:
      Per group, MFLOPs per example that one of its channels costs.
    """
    return {name: cost.channel_cost(report, original[name], "flops") / 1e6 for name in names}
