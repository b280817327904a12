"""Live metrics of a pruning run: what each method writes while it goes.

Every method with a workdir writes ``metrics.jsonl`` and TensorBoard events there
(`jaxprune.metrics.MetricsWriter`) on one step axis per run: the method's own steps first
(iterative: pruning steps; progressive: layers; blending: generations), then the updates of a
fine-tuning run through `jaxprune.fit.fit` (oneshot, blending, functional; iterative's final
updates and progressive's final step are not logged update by update), then one "result"
record with the final validation metrics and what is left of the model. Records are written
before the checkpoint of their step, and a resumed run drops the records after the step it
resumed from, so each step is logged once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxprune.metrics import MetricsWriter
from jaxprune.run import RunDir


def open_metrics(run: RunDir | None, resumed_step: int) -> MetricsWriter | None:
    """The run's metrics writer (None without a workdir).

    Args:
      run: the run directory.
      resumed_step: the last step the run has kept (restored checkpoints); records after it
        are dropped. Ignored for a fresh run, whose earlier records are removed.
    """
    if run is None:
        return None
    return run.metrics(resumed_step=resumed_step if run.resumed else None)


def checkpointed_steps(run: RunDir | None, name: str) -> int:
    """Steps a checkpoint sequence of the run holds (0: none yet)."""
    if run is None or not run.resumed:
        return 0
    return run.checkpoints(name).latest_step() or 0


def result_values(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a method summary's end: validation loss and accuracy after pruning (and
    fine-tuning), and the fraction left of each cost measure (FLOPs, MACs, parameters)."""
    values: dict[str, float] = {}
    after = summary.get("validation", {}).get("after")
    if isinstance(after, Mapping):
        values.update({k: float(after[k]) for k in ("loss", "accuracy") if k in after})
    cost = summary.get("cost", {})
    before, left = cost.get("before", {}), cost.get("after", {})
    for measure in ("flops", "macs", "params"):
        if before.get(measure):
            values[f"{measure}_left"] = float(left[measure]) / float(before[measure])
    return values


def write_result(metrics: MetricsWriter | None, step: int, summary: Mapping[str, Any]) -> None:
    """The run's last record ("result"), after its last step."""
    if metrics is not None:
        metrics.write(step, "result", **result_values(summary))
