"""Relevance criteria: one score per channel of every channel group, higher = more relevant.

A criterion is a `Criterion` (a NamedTuple of init / update / finalize functions); `score` runs
one over batches of data, and `CRITERIA` / `get_criterion` find them by name::

  from jaxprune.criteria import ScoringContext, score
  context = ScoringContext(model.apply, graph)
  scores = score("taylor", context, variables, batches)        # {group: np.ndarray}
  scores = normalize_l2(scores)

Families: weights (l1, l2, min_weight, fpgm, fermat, bn_gamma, bn_beta), activations
(activation_mean, activation_std, apoz, entropy, hrank, mutual_info), Taylor (taylor and its
variants, taylor_bn_gamma, taylor_bn_beta, taylor_weight_l1, taylor_weight_l2), the oracle
(oracle_loss, oracle_abs, and `loss_after_removal` for one group) and random.
"""

from jaxprune.criteria.activations import (
    activation_mean,
    activation_std,
    apoz,
    entropy,
    hrank,
    mutual_info,
)
from jaxprune.criteria.base import (
    Criterion,
    ScoringContext,
    softmax_cross_entropy,
)
from jaxprune.criteria.oracle import (
    RemovalLosses,
    loss_after_removal,
    oracle_abs,
    oracle_loss,
)
from jaxprune.criteria.randomized import random_scores
from jaxprune.criteria.registry import CRITERIA, get_criterion, register
from jaxprune.criteria.removal import removal_losses
from jaxprune.criteria.scoring import score
from jaxprune.criteria.taylor import (
    taylor,
    taylor_bn_beta,
    taylor_bn_gamma,
    taylor_weight_l1,
    taylor_weight_l2,
)
from jaxprune.criteria.transforms import (
    flops_per_channel,
    flops_regularize,
    normalize_l2,
    normalize_max,
    normalize_rank,
)
from jaxprune.criteria.weights import (
    bn_beta,
    bn_gamma,
    fermat,
    fpgm,
    geometric_median,
    l1_norm,
    l2_norm,
    mean_squared_weight,
)

__all__ = [
    "CRITERIA",
    "Criterion",
    "RemovalLosses",
    "ScoringContext",
    "activation_mean",
    "activation_std",
    "apoz",
    "bn_beta",
    "bn_gamma",
    "entropy",
    "fermat",
    "flops_per_channel",
    "flops_regularize",
    "fpgm",
    "geometric_median",
    "get_criterion",
    "hrank",
    "l1_norm",
    "l2_norm",
    "loss_after_removal",
    "mean_squared_weight",
    "mutual_info",
    "normalize_l2",
    "normalize_max",
    "normalize_rank",
    "oracle_abs",
    "oracle_loss",
    "random_scores",
    "register",
    "removal_losses",
    "score",
    "softmax_cross_entropy",
    "taylor",
    "taylor_bn_beta",
    "taylor_bn_gamma",
    "taylor_weight_l1",
    "taylor_weight_l2",
]
