"""How reproducible the oracle's ranking is, and what that caps.

The oracle (`oracle_loss`, `oracle_abs`) estimates each channel's loss change from a sample of
images; on an accurate network the changes are small and the estimate is noisy. A criterion is
judged by its Spearman correlation with that estimate, so the oracle's own noise caps what any
criterion can reach. The cap is measured here, at no extra cost: the oracle is scored on the two
halves of the images separately, and

- the split-half reliability of a layer is the Spearman correlation between the halves'
  rankings, ``r_half = rho(oracle(A), oracle(B))``;
- the reliability of the oracle on all the images follows from the Spearman-Brown formula,
  ``r_all = 2 r_half / (1 + r_half)`` (exact for Pearson correlations of parallel halves; an
  approximation for ranks);
- a criterion that ranked channels exactly as the oracle's expectation would still correlate
  only about ``sqrt(r_all)`` with a finite-sample oracle (the attenuation bound of classical test
  theory), so values near that ceiling are as good as this measurement can show.

The signed oracle is a mean over examples, so the halves combine exactly into the oracle on all
the images: ``s = (n_A s_A + n_B s_B) / (n_A + n_B)`` (and ``|s|`` for `oracle_abs`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune.criteria.base import Batch, Scores, ScoringContext
from jaxprune.criteria.rank_correlation import spearman
from jaxprune.criteria.scoring import score
from jaxprune.sharding import to_host

# The oracles this module can split: the signed one, and its absolute value.
SPLITTABLE = ("oracle_loss", "oracle_abs")


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """The reliability of a measurement `factor` times as long: ``k r / (1 + (k - 1) r)``.

    Args:
      r: the reliability of one part (a correlation in [-1, 1]; NaN passes through).
      factor: how many parts the whole has (2 for split halves).

    Returns:
      The predicted reliability of the whole; NaN for a negative `r` (the formula is meant
      for parts that agree; below 0 it leaves [-1, 1]).
    """
    if math.isnan(r) or r < 0:
        return math.nan  # halves that disagree: no reliability to extrapolate
    return factor * r / (1.0 + (factor - 1.0) * r)


@dataclasses.dataclass(frozen=True)
class SplitHalf:
    """The split-half reliability of a ranking, per layer.

    Attributes:
      per_layer: per group, the Spearman correlation between the two halves' scores.
      examples: the examples in each half.
    """

    per_layer: Mapping[str, float]
    examples: tuple[int, int]

    @property
    def whole(self) -> dict[str, float]:
        """Per group, the Spearman-Brown reliability of the ranking from both halves."""
        return {g: spearman_brown(r) for g, r in self.per_layer.items()}

    @property
    def ceiling(self) -> dict[str, float]:
        """Per group, about the highest Spearman a perfect criterion gets against the oracle
        on both halves: ``sqrt(whole)`` (NaN where the reliability is not positive)."""
        return {g: math.sqrt(r) if r > 0 else math.nan for g, r in self.whole.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the halves' sizes, and per group the three numbers."""

        def clean(values: Mapping[str, float]) -> dict[str, float | None]:
            return {g: None if math.isnan(v) else float(v) for g, v in values.items()}

        return {
            "examples_per_half": list(self.examples),
            "split_half": clean(self.per_layer),
            "whole": clean(self.whole),
            "ceiling": clean(self.ceiling),
        }


def split_half(half_a: Scores, half_b: Scores, examples: Sequence[int]) -> SplitHalf:
    """The split-half reliability of a criterion scored on two disjoint halves of the data.

    Args:
      half_a: ``{group: scores}`` on the first half.
      half_b: the same groups' scores on the second half.
      examples: the examples in each half.

    Returns:
      The `SplitHalf`.

    Raises:
      ValueError: the halves cover different groups or sizes.
    """
    if set(half_a) != set(half_b):
        raise ValueError(
            f"The halves score different groups: {sorted(half_a)} and {sorted(half_b)}."
        )
    per_layer = {}
    for group in half_a:
        a = np.asarray(half_a[group], np.float64)
        b = np.asarray(half_b[group], np.float64)
        if a.shape != b.shape:
            raise ValueError(
                f"Group {group!r} has {a.size} scores in one half and {b.size} in the other."
            )
        per_layer[group] = spearman(a, b) if a.size >= 2 else math.nan
    count_a, count_b = (int(n) for n in examples)
    return SplitHalf(per_layer, (count_a, count_b))


def split_halves(
    batches: Sequence[Batch], *, keep_odd: bool = False
) -> tuple[list[Batch], list[Batch]]:
    """The images of `batches` cut into two disjoint halves of equal size, each in batches of
    the first batch's size.

    Args:
      batches: batches (dicts of arrays with the same leading size).
      keep_odd: an odd last image joins the second half (every image is scored, as the
        recombined oracle needs); by default it is left out (halves of exactly equal size).

    Returns:
      (first half, second half): lists of host batches.
    """
    arrays = [to_host(dict(batch)) for batch in batches]
    if not arrays:
        return [], []
    flat = {k: np.concatenate([b[k] for b in arrays]) for k in arrays[0]}
    total = len(next(iter(flat.values())))
    middle = total // 2
    size = max(1, len(next(iter(arrays[0].values()))))

    def batched(start: int, stop: int) -> list[Batch]:
        return [
            {k: v[i : min(i + size, stop)] for k, v in flat.items()}
            for i in range(start, stop, size)
        ]

    return batched(0, middle), batched(middle, total if keep_odd else 2 * middle)


def oracle_by_halves(
    oracle: str,
    context: ScoringContext,
    variables: Any,
    batches: Sequence[Batch],
    **options: Any,
) -> tuple[Scores, SplitHalf]:
    """The oracle on all `batches`, scored as two halves, and its split-half reliability.

    The images are cut into two halves of equal size (the second has one more for an odd
    count), each re-batched at the first batch's size. Scoring the halves costs the same as
    scoring all the batches once; the combined scores equal the oracle on all of them up to
    float rounding.

    Args:
      oracle: "oracle_loss" or "oracle_abs".
      context: the model, its graph and the loss.
      variables: the model variables.
      batches: at least two batches ({"image", "label"}).
      **options: keyword options of the oracle (``groups``, ``batch_size``, ``mode``).

    Returns:
      (the oracle's scores on all batches, the reliability of its ranking).

    Raises:
      ValueError: an oracle not in `SPLITTABLE`, or fewer than two images.
    """
    if oracle not in SPLITTABLE:
        raise ValueError(f"Only {SPLITTABLE} can be scored by halves, not {oracle!r}.")
    if sum(int(np.shape(b["label"])[0]) for b in batches) < 2:
        raise ValueError("Scoring by halves needs at least two images.")
    halves = split_halves(batches, keep_odd=True)
    counts = [sum(int(np.shape(b["label"])[0]) for b in half) for half in halves]
    signed = [score("oracle_loss", context, variables, half, **options) for half in halves]
    total = sum(counts)
    combined = {g: (counts[0] * signed[0][g] + counts[1] * signed[1][g]) / total for g in signed[0]}
    if oracle == "oracle_abs":
        combined = {g: np.abs(s) for g, s in combined.items()}
        signed = [{g: np.abs(s) for g, s in half.items()} for half in signed]
    return combined, split_half(signed[0], signed[1], counts)
