"""Kill-and-resume tests: run a script through, kill a run (SIGKILL) once it has checkpointed,
and write and compare what the runs produced.

The scripts the tests run (tests/*_run.py) import the writing half; the tests the running and
comparing half.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def cpu_env(**changes: str) -> dict[str, str]:
    """This process's environment with JAX on the CPU (and `changes`)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", **changes)


def numbered_entries(directory: Path) -> list[int]:
    """The numbers that name entries of `directory`, sorted ([] when it does not exist).

    Orbax writes a checkpoint under a temporary name and renames it to its step when complete,
    so in a checkpoint folder these are the finished checkpoints.
    """
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def run_through(command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Runs `command` in the repository root to its end; fails on a non-zero exit."""
    env = cpu_env() if env is None else env
    subprocess.run(list(command), check=True, cwd=REPO_ROOT, env=env, timeout=300)


def kill_when(
    command: Sequence[str],
    ready: Callable[[], Any],
    *,
    what: str = "checkpoint",
    env: Mapping[str, str] | None = None,
) -> int:
    """Starts `command` and kills it (SIGKILL) as soon as `ready()` is truthy.

    Args:
      command: the command, run in the repository root.
      ready: polled every 5 ms, e.g. ``lambda: numbered_entries(workdir / "checkpoints")``.
      what: what `ready` waits for, named in the failure after 240 s without it.
      env: the environment (default: `cpu_env()`).

    Returns:
      The process's return code (``-signal.SIGKILL`` when the kill ended it).
    """
    import pytest  # here: the scripts that import this module do not need it

    env = cpu_env() if env is None else env
    process = subprocess.Popen(list(command), cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 240
    while not ready() and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} appeared within 240 s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    return process.wait()


def without_times(value: Any) -> Any:
    """`value` with every "time" entry of its dicts, at any depth, left out."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "time"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def save_variables(path: str | Path, variables: Any) -> None:
    """Writes a variables tree to an ``.npz`` file, one array per leaf path."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(variables)
    np.savez(Path(path), **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


def write_pruning_result(workdir: str | Path, result: Any) -> None:
    """Writes a pruning `Result` as WORKDIR/final.npz (variables) and WORKDIR/result.json
    (history, summary, keep and widths; timings left out)."""
    save_variables(Path(workdir, "final.npz"), result.variables)
    report = {
        "history": without_times(result.history),
        "summary": without_times(result.summary),
        "keep": {k: v.tolist() for k, v in result.keep.items()},
        "widths": result.widths,
    }
    Path(workdir, "result.json").write_text(json.dumps(report))


def assert_same_variables(a: str | Path, b: str | Path) -> None:
    """Two ``.npz`` files written by `save_variables` hold the same arrays, bit for bit."""
    with np.load(a) as first, np.load(b) as second:
        assert sorted(first.files) == sorted(second.files)
        for name in first.files:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def assert_same_result(whole: Path, resumed: Path) -> dict[str, Any]:
    """The two workdirs' result.json are equal and their final.npz too.

    Returns:
      The uninterrupted run's result.json.
    """
    expected = json.loads((whole / "result.json").read_text())
    assert json.loads((resumed / "result.json").read_text()) == expected
    assert_same_variables(whole / "final.npz", resumed / "final.npz")
    return expected


def kill_and_resume(
    command: Sequence[str], tmp_path: Path, checkpoints: str, *, what: str = "checkpoint"
) -> tuple[dict[str, Any], list[int], Path]:
    """Runs `command WORKDIR` whole; runs it again killed at its first checkpoint, then resumed.

    Args:
      command: the script's command line without the workdir argument.
      tmp_path: where the two workdirs go (``whole``, ``resumed``).
      checkpoints: the workdir's subfolder whose numbered entries are the checkpoints.
      what: what the kill waits for, named if it never appears.

    Returns:
      ``(expected, killed_at, whole)``: the uninterrupted run's result.json (equal to the resumed
      run's, whose final variables are equal too), the checkpoints that existed at the kill, and
      the uninterrupted run's workdir.
    """
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_through([*command, str(whole)])
    returncode = kill_when(
        [*command, str(resumed)], lambda: numbered_entries(resumed / checkpoints), what=what
    )
    assert returncode == -signal.SIGKILL
    assert not (resumed / "result.json").exists(), "the run finished before it was killed"
    killed_at = numbered_entries(resumed / checkpoints)
    run_through([*command, str(resumed)])
    return assert_same_result(whole, resumed), killed_at, whole
