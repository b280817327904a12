"""The choice of one iterative pruning step (Molchanov et al., ICLR 2017), as pure functions.

The scores of the surviving channels are normalised per layer (L2), optionally penalised by
what each channel costs (FLOPs regularisation), and the `k` lowest over all layers go (a global
ranking), never emptying a layer. Inputs and outputs are ``{group: array}`` maps; nothing here
knows about models or training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import criteria

NORMALIZATIONS = ("l2", "none")


def rank_scores(
    scores: Mapping[str, np.ndarray],
    masks: Mapping[str, Any],
    *,
    normalization: str = "l2",
    flops_cost: Mapping[str, Any] | None = None,
    flops_regularization: float = 0.0,
) -> dict[str, np.ndarray]:
    """The scores a global ranking compares: removed channels -inf, normalised, regularised.

    With ``normalization="l2"`` each layer's surviving scores are divided by their L2 norm,
    ``s_c / sqrt(sum_j s_j^2)`` (Molchanov et al. 2017, Sec. 2.2); the FLOPs regulariser then
    gives ``s_c - lambda * cost_c`` (Sec. 2.3).

    Args:
      scores: per group, one raw criterion score per channel (higher = more relevant).
      masks: per group, the current masks (1 kept, 0 removed); groups absent here keep all.
      normalization: "l2" (per-layer L2, the paper's) or "none".
      flops_cost: per group, the cost of one of its channels (MFLOPs); needed when
        `flops_regularization` > 0.
      flops_regularization: lambda of ``score - lambda * cost``.

    Returns:
      Per group, the ranked scores (-inf for removed channels).

    Raises:
      ValueError: an unknown normalisation, or a regulariser without costs.
    """
    masked = {}
    for name, values in scores.items():
        s = np.asarray(values, np.float64).copy()
        if name in masks:
            s[np.asarray(masks[name]) == 0] = -np.inf
        masked[name] = s
    if normalization == "l2":
        masked = criteria.normalize_l2(masked)
    elif normalization != "none":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
    if flops_regularization > 0:
        if flops_cost is None:
            raise ValueError("flops_regularization > 0 needs flops_cost (MFLOPs per channel).")
        masked = criteria.flops_regularize(masked, flops_cost, strength=flops_regularization)
    return masked


def choose_removals(
    ranked: Mapping[str, np.ndarray],
    masks: Mapping[str, Any],
    groups: Sequence[str],
    count: int,
    *,
    min_channels: int = 1,
    blocks: Mapping[str, int] | None = None,
) -> list[tuple[str, int]]:
    """The `count` lowest-ranked surviving channels over all `groups` (a global ranking).

    A group already down to `min_channels` survivors gives no more; ties go to the earlier
    group in `groups`, then to the lower channel index. A group normalised in blocks
    (GroupNorm, `ChannelGroup.block` > 1) loses whole blocks: a block is ranked by the mean of
    its channels' scores and taken while fewer than `count` channels are chosen, so a step may
    remove up to ``block - 1`` channels more than `count`.

    Args:
      ranked: per group, one score per channel (e.g. from `rank_scores`); -inf entries that
        the masks mark as removed are skipped.
      masks: per group, the current masks (1 kept, 0 removed); groups absent here keep all.
      groups: the groups that may lose channels, in tie-breaking order.
      count: how many channels to remove (k).
      min_channels: the fewest channels a group may keep (>= 1).
      blocks: per group, its block size (absent: 1).

    Returns:
      The chosen (group, channel) pairs, lowest score first (a block's channels together);
      fewer than `count` when not enough channels can be removed.

    Raises:
      ValueError: a NaN score, an unknown group, `min_channels` < 1, or a group whose
        survivors are not whole blocks.
    """
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1 (never empty a group), got {min_channels}.")
    blocks = blocks or {}
    candidates = []
    alive_count = {}
    for order, name in enumerate(groups):
        if name not in ranked:
            raise ValueError(f"No scores for group {name!r}; scored groups: {sorted(ranked)}.")
        values = np.asarray(ranked[name], np.float64)
        if np.isnan(values).any():
            # Training divergence is caught before scoring (fit.DivergenceError), so a NaN
            # here comes from the criterion itself.
            raise ValueError(f"Scores of group {name!r} contain NaN; check the criterion.")
        alive = np.ones(values.size, bool) if name not in masks else np.asarray(masks[name]) != 0
        alive_count[name] = int(alive.sum())
        size = int(blocks.get(name, 1))
        by_block = alive.reshape(-1, size)
        if (by_block.any(axis=1) != by_block.all(axis=1)).any():
            raise ValueError(f"Group {name!r} has partly removed blocks of {size} channels.")
        block_scores = np.where(by_block, values.reshape(-1, size), 0.0).mean(axis=1)
        candidates += [
            (float(block_scores[b]), order, b * size, name, size)
            for b in np.nonzero(by_block[:, 0])[0]
        ]
    candidates.sort(key=lambda t: t[:3])
    chosen: list[tuple[str, int]] = []
    for _, _, first, name, size in candidates:
        if len(chosen) >= count:
            break
        if alive_count[name] - size >= min_channels:
            chosen += [(name, first + c) for c in range(size)]
            alive_count[name] -= size
    return chosen


def remove_channels(
    masks: Mapping[str, Any], removals: Sequence[tuple[str, int]]
) -> dict[str, jax.Array]:
    """New masks with the given (group, channel) pairs set to 0; the inputs are not changed.

    Args:
      masks: per group, the current masks (1 kept, 0 removed).
      removals: (group, channel) pairs, e.g. from `choose_removals`.

    Returns:
      The new masks (float32 arrays of the same shapes).

    Raises:
      ValueError: a channel that is already removed.
    """
    updated = {name: np.asarray(mask, np.float32).copy() for name, mask in masks.items()}
    for name, channel in removals:
        if updated[name][channel] == 0:
            raise ValueError(f"Channel {channel} of group {name!r} is already removed.")
        updated[name][channel] = 0.0
    return {name: jnp.asarray(mask) for name, mask in updated.items()}
