"""What the paper methods read and report besides their own steps.

* `first_examples`: the fixed images that criteria, fitness functions and representatives read
  (the first ones of the validation split), re-cut into the method's batch size, so a run reads
  the same images in the same batches (and has the same fingerprint) however the data is batched.
* `finetuned_summary`: cost and validation metrics before pruning, right after it and at the
  end (after the method's own fine-tuning), with the fine-tuning's history.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune import train
from jaxprune.methods.contract import PruneData
from jaxprune.methods.oneshot import summarize
from jaxprune.model import Model
from jaxprune.sharding import to_host


def first_examples(
    batches: Iterable[Mapping[str, Any]], count: int, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """The first `count` examples of `batches`, re-cut into batches of `batch_size`.

    The fitness and the criteria read fixed images: the first ones of the validation split,
    whatever batches the data arrives in, so a run reads the same images in the same batches
    (and its fingerprint is the same) for any batching of the data.

    Args:
      batches: batches ``{"image", "label", ...}`` (arrays with the examples first); read only
        as far as needed.
      count: how many examples (fewer when `batches` run out first).
      batch_size: examples per batch returned (the last one may be smaller).

    Returns:
      Host (NumPy) batches with the same keys.

    Raises:
      ValueError: `count` or `batch_size` below 1, or batches without examples.
    """
    if count < 1 or batch_size < 1:
        raise ValueError(f"count and batch_size must be >= 1, got {count} and {batch_size}.")
    parts: list[dict[str, np.ndarray]] = []
    seen = 0
    for batch in batches:
        size = np.shape(batch["image"])[0]
        take = min(size, count - seen)
        rows = {k: v for k, v in batch.items() if np.shape(v)[:1] == (size,)}
        parts.append({k: v[:take] for k, v in to_host(rows).items()})
        seen += take
        if seen >= count:
            break
    if seen == 0:
        raise ValueError("The data yields no example; give at least one {'image', 'label'} batch.")
    joined = {
        k: np.concatenate([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)
    }
    return [
        {k: v[i : i + batch_size] for k, v in joined.items()} for i in range(0, seen, batch_size)
    ]


def finetuned_summary(
    model: Model,
    variables: Any,
    small: Model,
    pruned_variables: Any,
    final_variables: Any,
    data: PruneData,
    tuning: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Cost and validation metrics before pruning and at the end (`oneshot.summarize`), plus,
    when the pruned model was fine-tuned, its metrics before fine-tuning and the fine-tuning's
    history.

    Args:
      model, variables: the original model.
      small: the pruned model (the pruned program).
      pruned_variables: its variables right after pruning.
      final_variables: its variables at the end (after fine-tuning, if any).
      data: the validation batches are evaluated.
      tuning: the fine-tuning's history (empty: no fine-tuning).

    Returns:
      ``{"cost", "validation": {"before", "after", "pruned"?}, "finetune": [...]}``.
    """
    summary = summarize(model, variables, small, final_variables, data)
    summary["finetune"] = [dict(r) for r in tuning]
    if "validation" in summary:
        summary["validation"]["pruned"] = (
            train.evaluate(small, pruned_variables, data.validation())
            if tuning
            else summary["validation"]["after"]
        )
    return summary
