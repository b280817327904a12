"""Spearman's rank correlation with average ranks for ties (what scipy.stats.spearmanr
computes), in NumPy: the one definition every criterion comparison uses."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def average_ranks(values: Any) -> np.ndarray:
    """Ranks 1..n of a vector; tied values share the mean of the ranks they span.

    Args:
      values: a 1-D array of numbers (-inf allowed, NaN not).

    Returns:
      float64 ranks, e.g. ``[10, 20, 20, 5] -> [2, 3.5, 3.5, 1]``.

    Raises:
      ValueError: not 1-D, or NaN entries.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1:
        raise ValueError(f"average_ranks needs a 1-D vector, got shape {values.shape}.")
    if np.isnan(values).any():
        raise ValueError("Cannot rank NaN scores; remove them or fix the criterion.")
    n = values.size
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # A run of equal values starts wherever the sorted value changes.
    starts_run = np.concatenate([[True], ordered[1:] != ordered[:-1]]) if n else np.zeros(0, bool)
    run_of = np.cumsum(starts_run) - 1
    starts = np.flatnonzero(starts_run)
    ends = np.append(starts[1:], n)
    # Positions starts..ends-1 hold ranks starts+1..ends; their mean is (starts + ends + 1) / 2.
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(n, np.float64)
    ranks[order] = run_rank[run_of]
    return ranks


def paired_scores(name: str, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two score vectors as float64, checked for what a rank correlation needs.

    Args:
      name: the correlation, as error messages name it.
      a: a 1-D vector of scores.
      b: a 1-D vector of the same length.

    Returns:
      ``(a, b)`` as float64 arrays.

    Raises:
      ValueError: different shapes, not 1-D, fewer than two entries, or NaN entries.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"{name} needs two 1-D vectors of the same length, got {a.shape} and {b.shape}."
        )
    if a.size < 2:
        raise ValueError(f"{name} needs at least two entries, got {a.size}.")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("Cannot rank NaN scores; remove them or fix the criterion.")
    return a, b


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks.

    Args:
      a: a 1-D vector of scores.
      b: a 1-D vector of the same length.

    Returns:
      rho in [-1, 1]; NaN when either vector is constant (no ranking to compare), as
      `scipy.stats.spearmanr` does.

    Raises:
      ValueError: different shapes, fewer than two entries, or NaN entries.
    """
    a, b = paired_scores("spearman", a, b)
    ra = average_ranks(a) - (a.size + 1) / 2.0
    rb = average_ranks(b) - (b.size + 1) / 2.0
    denominator = math.sqrt(float(np.dot(ra, ra)) * float(np.dot(rb, rb)))
    if denominator == 0.0:
        return math.nan
    return float(np.clip(np.dot(ra, rb) / denominator, -1.0, 1.0))
