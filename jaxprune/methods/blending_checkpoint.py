"""The checkpoint of an evolutionary search: one small JSON file per finished generation.

The search's state is a handful of numbers (the next population, the best genome so far, the
history), so it is stored as JSON in the run directory (``search/generation_NNNNNN.json``),
written atomically by `RunDir.write_json`: a kill at any moment leaves either the previous
generation's file or the new one, never half a file. Python's JSON writes floats with `repr`,
which reads back to the same float64 bits, so a resumed search continues bit for bit. The random
state is not stored as such: generation g draws from a generator seeded with (seed, g)
(`evolution.generation_rng`).

The newest file and the one before it are kept: a damaged newest file (cut by a full disk) falls
back to the previous generation, and with none readable the search starts again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jaxprune.checkpoint import CheckpointError
from jaxprune.run import RunDir
from jaxprune.runtime import is_main_process

FORMAT = "jaxprune-blending-search"
VERSION = 2
FOLDER = "search"
_NAME = re.compile(r"^generation_(\d{6})\.json$")
# Older generation files kept besides the newest (the rest are deleted).
_KEEP_OLDER = 1


class SearchCheckpointError(ValueError):
    """A search checkpoint that belongs to another search."""


def checkpoint_files(run: RunDir) -> list[str]:
    """The generation files of a run's search, oldest first.

    Args:
      run: the run directory.

    Returns:
      Names relative to the run's folder (``search/generation_000003.json``).
    """
    directory = run.path / FOLDER
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [f"{FOLDER}/{name}" for _, name in sorted(found)]


def save_search(run: RunDir, state: Mapping[str, Any]) -> str:
    """Writes the state after a generation atomically; keeps the newest files only.

    Args:
      run: the run directory.
      state: JSON-compatible, with an integer "generation" (generations finished).

    Returns:
      The name of the file written, relative to the run's folder.
    """
    name = f"{FOLDER}/generation_{int(state['generation']):06d}.json"
    run.write_json(name, {"format": FORMAT, "version": VERSION, **state})
    if is_main_process():  # one process writes and cleans up the shared workdir
        for old in checkpoint_files(run)[: -1 - _KEEP_OLDER]:
            (run.path / old).unlink(missing_ok=True)
    return name


def load_search(run: RunDir, fingerprint: str) -> dict[str, Any] | None:
    """The newest readable checkpoint of the run's search, or None when there is none.

    Args:
      run: the run directory.
      fingerprint: what the caller's search is (settings, genome layout, candidate scores,
        model and fitness images); a stored state with another fingerprint is refused.

    Returns:
      The stored state, or None (nothing stored, or nothing readable: the search restarts).

    Raises:
      SearchCheckpointError: the newest readable checkpoint is of another search.
    """
    for name in reversed(checkpoint_files(run)):
        try:
            state = run.read_json(name)
        except CheckpointError:
            continue  # damaged: try the generation before
        if (
            not isinstance(state, dict)
            or state.get("format") != FORMAT
            or state.get("version") != VERSION
        ):
            continue
        if state.get("fingerprint") != fingerprint:
            raise SearchCheckpointError(
                f"{run.path / name} holds a search with other settings, criteria scores, model or "
                f"fitness images; use a new workdir, or delete {run.path / FOLDER} to start this "
                "search afresh."
            )
        return state
    return None
