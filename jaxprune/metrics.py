"""Live metrics of a run: JSON lines and TensorBoard event files, written as the run goes.

`MetricsWriter(workdir)` appends one record per call to ``<workdir>/metrics.jsonl`` and, through
tensorboardX (a small library: numpy and protobuf), adds its numbers as TensorBoard scalars to
``<workdir>/tensorboard/`` (``tensorboard --logdir <workdir>``). The JSON lines are written at
every record and the event file within a second, so a run can be watched while it goes. A
resumed run passes the step it resumed from: the JSON lines after it are dropped and TensorBoard
is told to discard its later events, so each step is in the logs once.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

from jaxprune.checkpoint import json_default

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch when it is installed, only to recognise torch tensors, which
    jaxprune never passes. Loaded into a JAX process, PyTorch brings its own threading and
    allocator state; a later XLA compile in the same process was seen to crash. So torch is
    hidden while tensorboardX loads, unless the process has imported it already.
    """
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Writes metric records of a run (see the module docstring).

    Args:
      workdir: the run's folder.
      resumed_step: the step the run resumed from (None: a fresh run, earlier logs removed).
      tensorboard: also write TensorBoard event files.
      enabled: write at all (False: records are returned, nothing is written; the processes
        other than the first of a multi-process run).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resumed_step: int | None = None,
        tensorboard: bool = True,
        enabled: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / JSONL
        self.enabled = enabled
        self._board = None
        if not enabled:
            return
        self._truncate(resumed_step)
        if tensorboard:
            SummaryWriter = _summary_writer_class()  # noqa: N806
            purge = None if resumed_step is None else resumed_step + 1
            # The writer's thread writes queued events and flushes the file every second.
            self._board = SummaryWriter(
                logdir=str(self.workdir / TENSORBOARD), purge_step=purge, flush_secs=1
            )

    def _truncate(self, resumed_step: int | None) -> None:
        if not self.path.exists():
            return
        if resumed_step is None:
            self.path.unlink()
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= resumed_step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, kind: str = "train", **values: Any) -> dict[str, Any]:
        """Records `values` at `step`; numbers also go to TensorBoard as ``<kind>/<name>``.

        Returns:
          The record written (with ``step`` and ``kind``).
        """
        record = {"step": int(step), "kind": kind, **values}
        if not self.enabled:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=json_default) + "\n")
        if self._board is not None:
            for name, value in _scalars(values):
                self._board.add_scalar(f"{kind}/{name}", value, int(step))
        return record

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _scalars(values: dict[str, Any], prefix: str = ""):
    """(name, float) of every finite number in `values` (nested dicts as ``a/b``)."""
    for name, value in values.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{name}/")
        elif isinstance(value, numbers.Number) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                yield f"{prefix}{name}", number
        elif hasattr(value, "shape") and getattr(value, "shape", None) == ():
            number = float(value)
            if math.isfinite(number):
                yield f"{prefix}{name}", number
