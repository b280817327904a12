"""Timing helpers shared by the benchmarks: turn-taking medians and the machine's CPU pressure."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np


def cpu_pressure() -> float | None:
    """The share of the last 10 s in which some task waited for a CPU (Linux PSI), in %."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    fields = dict(part.split("=") for part in first.split()[1:])
    return float(fields["avg10"])


def take_turns(
    runners: dict[str, Callable[[], Any]],
    rounds: int,
    per_round: int,
    settle_s: float = 0.3,
) -> dict[str, dict[str, float]]:
    """Times each runner ``rounds * per_round`` times, the runners taking turns every round.

    The machine is shared: taking turns exposes every runner to the same load, so ratios of
    medians from one call stay meaningful when the absolute times drift. Each turn starts
    after a pause and one untimed call: an OpenMP runtime (PyTorch's) keeps its threads
    spinning for a while after a call, and without the pause they slowed whichever runner
    came next (measured: jaxprune's LeNet-5 inference at batch 1, 27% slower right after
    PyTorch's turn than in a process without PyTorch).

    Args:
      runners: name -> a callable that runs one blocking call.
      rounds: how many turns each runner takes.
      per_round: timed calls per turn.
      settle_s: the pause before each turn, in seconds.

    Returns:
      Per runner: median and min wall time and median CPU time (user + system of this
      process, 10 ms resolution) of one call, in ms.
    """
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(settle_s)
            run()
            for _ in range(per_round):
                before, start = os.times(), time.perf_counter()
                run()
                end, after = time.perf_counter(), os.times()
                wall[name].append(end - start)
                cpu[name].append(after.user + after.system - before.user - before.system)
    return {
        name: {
            "median_ms": float(np.median(wall[name]) * 1e3),
            "min_ms": float(np.min(wall[name]) * 1e3),
            "cpu_median_ms": float(np.median(cpu[name]) * 1e3),
        }
        for name in runners
    }


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of `repeats` calls of `fn` (outputs waited for), and the last output."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree_util.tree_leaves(out))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out
