"""jaxprune: remove whole kernels from convolutional networks in JAX/Flax, by pure functions.

The public API is this flat namespace (``import jaxprune as jp``); the modules behind it are
implementation details.

Example:
  >>> graph = jp.channel_graph(model.apply, variables, x)
  >>> pruned = jp.prune(variables, graph, {"conv1": [0, 2, 5]})
  >>> logits = pruned.apply_fn(pruned.variables, x)
"""

from jaxprune import nnx
from jaxprune import ops as _ops  # noqa: F401  (applies the CPU compiler defaults first)
from jaxprune.gates import activations_and_gradients, gated_apply_fn, gated_call, map_over_masks
from jaxprune.graph import ChannelGraph, ChannelGroup, GraphError, channel_graph
from jaxprune.program import PrunedProgram
from jaxprune.rebuild import rebuild_linen
from jaxprune.surgery import (
    Pruned,
    PruneError,
    compose_keep,
    keep_to_masks,
    masks_to_keep,
    prune,
    round_keep_to_blocks,
)
from jaxprune.widths import widths_from_params

__version__ = "0.1.0"

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "GraphError",
    "PruneError",
    "Pruned",
    "PrunedProgram",
    "activations_and_gradients",
    "channel_graph",
    "compose_keep",
    "gated_apply_fn",
    "gated_call",
    "keep_to_masks",
    "map_over_masks",
    "masks_to_keep",
    "nnx",
    "prune",
    "rebuild_linen",
    "round_keep_to_blocks",
    "widths_from_params",
]
