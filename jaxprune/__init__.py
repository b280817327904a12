"""jaxprune: remove whole kernels from convolutional networks in JAX/Flax, by pure functions.

The public API is this flat namespace (``import jaxprune as jp``); the modules behind it are
implementation details.

Layers, from the bottom: the channel graph and gates (`channel_graph`, `gated_call`), pure
surgery (`prune`, `Pruned`, `PrunedProgram`), cost (`count_cost`), criteria (`score`,
`criteria`), training (`Model`, `create_train_state`, `train_step`, `fit`), and the methods
of the four papers and their baselines, all called the same way::

    result = jp.oneshot_prune(model, variables, data, jp.OneShotConfig(ratio=0.5))

Example:
  >>> graph = jp.channel_graph(model.apply, variables, x)
  >>> pruned = jp.prune(variables, graph, {"conv1": [0, 2, 5]})
  >>> logits = pruned.apply_fn(pruned.variables, x)
"""

from jaxprune import ops as _ops  # noqa: F401, I001  (applies the CPU compiler defaults first)
from jaxprune import criteria, nnx
from jaxprune.cost import CostReport
from jaxprune.cost import count as count_cost
from jaxprune.criteria import CRITERIA, score
from jaxprune.fit import DivergenceError, FitConfig, fit
from jaxprune.gates import activations_and_gradients, gated_apply_fn, gated_call, map_over_masks
from jaxprune.graph import ChannelGraph, ChannelGroup, GraphError, channel_graph
from jaxprune.methods.blending import BlendingConfig, blending_prune
from jaxprune.methods.contract import BatchList, PruneData, PruneResult, Splits, as_prune_data
from jaxprune.methods.functional import FunctionalConfig, functional_prune
from jaxprune.methods.iterative import IterativeConfig, iterative_prune
from jaxprune.methods.oneshot import OneShotConfig, oneshot_prune
from jaxprune.methods.progressive import ProgressiveConfig, progressive_prune
from jaxprune.methods.registry import METHODS, MethodSpec
from jaxprune.methods.selection import Selection, keep_from_scores
from jaxprune.metrics import MetricsWriter
from jaxprune.model import Model
from jaxprune.program import PrunedProgram
from jaxprune.rebuild import rebuild_linen
from jaxprune.run import RunDir, RunLockedError, RunMismatchError
from jaxprune.surgery import (
    Pruned,
    PruneError,
    compose_keep,
    keep_to_masks,
    masks_to_keep,
    prune,
    round_keep_to_blocks,
)
from jaxprune.train import (
    OptimizerConfig,
    TrainState,
    create_train_state,
    eval_step,
    evaluate,
    train_step,
)
from jaxprune.widths import widths_from_params

__version__ = "0.1.0"

__all__ = [
    "BatchList",
    "BlendingConfig",
    "CRITERIA",
    "ChannelGraph",
    "ChannelGroup",
    "CostReport",
    "DivergenceError",
    "FitConfig",
    "FunctionalConfig",
    "GraphError",
    "IterativeConfig",
    "METHODS",
    "MethodSpec",
    "MetricsWriter",
    "Model",
    "OneShotConfig",
    "OptimizerConfig",
    "ProgressiveConfig",
    "PruneData",
    "PruneError",
    "PruneResult",
    "Pruned",
    "PrunedProgram",
    "RunDir",
    "RunLockedError",
    "RunMismatchError",
    "Selection",
    "Splits",
    "TrainState",
    "activations_and_gradients",
    "as_prune_data",
    "blending_prune",
    "channel_graph",
    "compose_keep",
    "count_cost",
    "create_train_state",
    "criteria",
    "eval_step",
    "evaluate",
    "fit",
    "functional_prune",
    "gated_apply_fn",
    "gated_call",
    "iterative_prune",
    "keep_from_scores",
    "keep_to_masks",
    "map_over_masks",
    "masks_to_keep",
    "nnx",
    "oneshot_prune",
    "progressive_prune",
    "prune",
    "rebuild_linen",
    "round_keep_to_blocks",
    "score",
    "train_step",
    "widths_from_params",
]
