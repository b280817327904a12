"""The checkpoint of an evolutionary search: one small JSON file per finished generation.

The search's state is a handful of numbers (the next population, the best genome so far, the
history), so it is stored as JSON, written to a temporary file and renamed into place: a kill
at any moment leaves either the previous generation's file or the new one, never half a file.
Python's JSON writes floats with `repr`, which reads back to the same float64 bits, so a
resumed search continues bit for bit. The random state is not stored as such: generation g
draws from a generator seeded with (seed, g) (`evolution.generation_rng`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "jaxprune-blending-search"
VERSION = 1
_NAME = re.compile(r"^generation_(\d{6})\.json$")
# Older generation files kept besides the newest (the rest are deleted).
_KEEP_OLDER = 1


class SearchCheckpointError(ValueError):
    """A search checkpoint that belongs to another search, or cannot be read."""


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The generation files of a search directory.

    Args:
      directory: the search's checkpoint folder (missing: none).

    Returns:
      Paths, oldest generation first.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_search(directory: str | Path, state: Mapping[str, Any]) -> Path:
    """Writes the state after a generation atomically; keeps the newest files only.

    Args:
      directory: the search's checkpoint folder (created if missing).
      state: JSON-compatible, with an integer "generation" (generations finished).

    Returns:
      The file written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"generation_{int(state['generation']):06d}.json"
    temporary = path.with_suffix(".json.tmp")
    with temporary.open("w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    for old in checkpoint_files(directory)[: -1 - _KEEP_OLDER]:
        old.unlink()
    return path


def load_search(directory: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The newest checkpoint of a search, or None when there is none.

    Args:
      directory: the search's checkpoint folder.
      fingerprint: what the caller's search is (config, candidates, scores); a stored state
        with another fingerprint is refused.

    Returns:
      The stored state, or None.

    Raises:
      SearchCheckpointError: the checkpoint is of another search or format.
    """
    files = checkpoint_files(directory)
    if not files:
        return None
    path = files[-1]
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SearchCheckpointError(f"Cannot read search checkpoint {path}: {error}.") from error
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise SearchCheckpointError(f"{path} is not a {FORMAT} v{VERSION} file.")
    if state.get("fingerprint") != fingerprint:
        raise SearchCheckpointError(
            f"{path} holds a search with other settings, criteria scores, model or fitness "
            f"images; use a new workdir, or delete {Path(directory)} to start this search afresh."
        )
    return state
