"""The random baseline: seeded uniform scores, so a random pruning can be repeated exactly."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from jaxprune.criteria.base import Criterion, Masks, Scores, ScoringContext, ignore_batch, no_state


def random_scores(*, seed: int = 0) -> Criterion:
    """Uniform random scores in [0, 1), the baseline every criterion should beat.

    Each group draws from its own stream, seeded by (`seed`, CRC-32 of the group name), so a
    group's scores depend only on the seed and its name and size: not on the other groups, the
    data, or the process (Python's `hash` of a string would change between processes).

    Args:
      seed: a non-negative integer.

    Returns:
      The criterion "random".
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")

    def finalize(
        state: None, context: ScoringContext, variables: Any, masks: Masks | None
    ) -> Scores:
        scores = {}
        for group in context.graph.groups:
            stream = np.random.default_rng([seed, zlib.crc32(group.name.encode())])
            scores[group.name] = stream.random(group.size)
        return scores

    return Criterion("random", no_state, ignore_batch, finalize, uses_batches=False)
