"""Kernel selection files: which kernels of which layers a person (or a stand-in) chose to remove.

The kernel-selection page (`jaxprune inspect`) exports one, and a progressive run with the
subjective criterion replays it (`ProgressiveConfig.selection`) or waits for it layer by layer.
The file is JSON:

    {"format": "jaxprune-kernel-selection/1",
     "chosen_by": "person",                 # or "stand-in:<rule>" for a scripted choice
     "model_fingerprint": "<sha256>",       # optional: the model the choice was made on
     "layers": {"<group>": {"num_kernels": 32, "remove": [3, 7, 12]}, ...}}

Indices count the layer's kernels as the page showed them, i.e. in the layer's current width. A
directory of such files (one per layer, any names) reads as their union.

Nothing is coerced: ``num_kernels`` is a positive integer and ``remove`` a list of integers
(``"12"``, ``1.5``, ``true`` or ``null`` are refused, naming the layer and the file), so a file
means exactly what it says or is an error.

``model_fingerprint`` is `jaxprune.checkpoint.tree_fingerprint` of the variables the page was
made from (`model_fingerprint` here). Indices mean nothing on another model, so `check_against`
refuses a file whose fingerprint is not one of the model's; a file without one (written by a
script) is taken on trust.

This module is below `jaxprune.methods` and `jaxprune.inspect`, which both read and write the
format (`jaxprune.inspect.selection` re-exports it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.checkpoint import tree_fingerprint

FORMAT = "jaxprune-kernel-selection/1"
# Hex digits of a fingerprint shown in messages and on the page (the file keeps all 64).
SHORT_FINGERPRINT = 16
# A file that is not JSON yet is taken as still being written until it is this old (seconds).
SETTLE_S = 5.0


class SelectionError(ValueError):
    """A selection file that cannot be used as it is."""


def model_fingerprint(variables: Any) -> str:
    """The fingerprint a selection records: SHA-256 of the model's variables (hex).

    Args:
      variables: the model variables the kernels were shown from.

    Returns:
      `jaxprune.checkpoint.tree_fingerprint` of them (64 hex digits), the same value a
      progressive run computes for its base model.
    """
    return tree_fingerprint(variables)


def selection_document(
    removals: Mapping[str, Sequence[int]],
    num_kernels: Mapping[str, int],
    *,
    chosen_by: str = "person",
    model_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The JSON document of a selection.

    Args:
      removals: group name -> indices of the kernels to remove.
      num_kernels: group name -> the layer's kernel count when the choice was made.
      chosen_by: "person", or "stand-in:<rule>" when a script chose.
      model_fingerprint: `model_fingerprint` of the model chosen on; None: not recorded (the
        file is then accepted for any model whose layer widths fit).

    Returns:
      The document (`write_selection` writes it).

    Raises:
      SelectionError: an index out of range, a repeated index, a layer without a kernel count,
        or a choice that would remove every kernel of a layer.
    """
    layers = {}
    for group, indices in removals.items():
        if group not in num_kernels:
            raise SelectionError(
                f"No kernel count for layer {group!r}; pass num_kernels[{group!r}]."
            )
        size = _count(group, num_kernels[group], "selection_document")
        layers[group] = {
            "num_kernels": size,
            "remove": _checked(group, indices, size, "selection_document").tolist(),
        }
    document: dict[str, Any] = {"format": FORMAT, "chosen_by": chosen_by}
    if model_fingerprint is not None:
        document["model_fingerprint"] = str(model_fingerprint)
    document["layers"] = layers
    return document


def write_selection(path: str | Path, document: Mapping[str, Any]) -> Path:
    """Writes a selection document as JSON (validated first: see `read_selection`).

    Args:
      path: the file to write (parent folders are created).
      document: a document from `selection_document`.

    Returns:
      The path written.
    """
    path = Path(path)
    _parse(dict(document), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))
    return path


def read_selection(path: str | Path) -> dict[str, dict[str, Any]]:
    """Reads a selection file, or the union of a directory of them.

    Args:
      path: a JSON file, or a directory of JSON files (one layer each, for instance).

    Returns:
      group -> ``{"num_kernels": int, "remove": np.ndarray of int, "chosen_by": str,
      "model_fingerprint": str or None, "file": str}`` (the file the layer came from).

    Raises:
      FileNotFoundError: no such file or directory, or a directory without JSON files.
      SelectionError: a file that is not a selection, values of the wrong type, indices out of
        range or repeated, or one layer chosen in two files.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"No selection files (*.json) in {path}.")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"No selection file {path}. Export one from the page `jaxprune inspect` writes."
        )
    layers: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            document = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise SelectionError(f"{file} is not JSON ({error}).") from None
        for group, layer in _parse(document, str(file)).items():
            if group in layers:
                raise SelectionError(f"Layer {group!r} is chosen twice (again in {file}).")
            layers[group] = layer
    return layers


def check_against(
    layers: Mapping[str, Mapping[str, Any]],
    sizes: Mapping[str, int],
    *,
    fingerprints: str | Collection[str] | None = None,
) -> None:
    """Checks that a selection fits a model: its fingerprint and its current layer widths.

    Args:
      layers: what `read_selection` returned.
      sizes: group name -> current number of kernels (e.g. ``{g: graph[g].size ...}``).
      fingerprints: the model's `model_fingerprint` (or several accepted ones: a progressive
        run accepts its base model's and the current one's); None: not checked. A layer read
        from a file without a fingerprint passes this check.

    Raises:
      SelectionError: a selection made on another model (both fingerprints named), a layer the
        model does not have, or one whose width changed since the choice was made (its indices
        would point at other kernels).
    """
    accepted = (
        None
        if fingerprints is None
        else {fingerprints}
        if isinstance(fingerprints, str)
        else set(fingerprints)
    )
    for group, layer in layers.items():
        recorded = layer.get("model_fingerprint")
        if accepted is not None and recorded is not None and recorded not in accepted:
            ours = " or ".join(sorted(_short(f) for f in accepted))
            raise SelectionError(
                f"The selection {layer.get('file', '')} was made on another model: its layer "
                f"{group!r} was chosen on the model with fingerprint {_short(recorded)}, but "
                f"this model's fingerprint is {ours}. Its kernel indices mean nothing here: "
                "choose again on this model's page (`jaxprune inspect --model-file <this "
                "model>`, or the page a waiting run writes) and export a new file."
            )
    for group, layer in layers.items():
        if group not in sizes:
            raise SelectionError(
                f"The selection names layer {group!r}, which this model does not have "
                f"(its layers: {sorted(sizes)}). Was it made for another model?"
            )
        if int(sizes[group]) != int(layer["num_kernels"]):
            raise SelectionError(
                f"Layer {group!r} has {sizes[group]} kernels but the selection was made when it "
                f"had {layer['num_kernels']}; make the selection again on this model."
            )


def read_layer(
    path: str | Path,
    group: str,
    size: int,
    *,
    fingerprints: str | Collection[str] | None = None,
) -> tuple[np.ndarray, str]:
    """One layer's choice from a selection file, checked against the layer.

    Args:
      path: a selection file or directory.
      group: the layer.
      size: its current number of kernels.
      fingerprints: the accepted model fingerprints (see `check_against`).

    Returns:
      (sorted indices to remove, who chose: "person" or "stand-in:<rule>").

    Raises:
      SelectionError: the file has no choice for `group`, or one that does not fit.
    """
    layers = read_selection(path)
    if group not in layers:
        raise SelectionError(f"{path} holds no choice for layer {group!r}.")
    check_against({group: layers[group]}, {group: size}, fingerprints=fingerprints)
    return layers[group]["remove"], layers[group]["chosen_by"]


def file_complete(path: Path) -> bool:
    """Whether `path` holds a whole file: a browser may create it before writing it.

    An empty file, or one that is not JSON yet and changed in the last `SETTLE_S` seconds, is
    still being written; a broken file older than that is taken (reading it then says why it is
    broken).
    """
    try:
        stat = path.stat()
        if not path.is_file() or stat.st_size == 0:
            return False
        json.loads(path.read_text())
        return True
    except FileNotFoundError:
        return False
    except (ValueError, UnicodeDecodeError):
        return time.time() - stat.st_mtime > SETTLE_S


def wait_for_file(
    paths: Sequence[Path], *, poll_seconds: float = 1.0, timeout_s: float | None = None
) -> Path:
    """Waits until one of `paths` holds a whole file (`file_complete`); returns it.

    Args:
      paths: the files to look for; when several are there, the first listed wins.
      poll_seconds: seconds between two looks.
      timeout_s: how long to wait; None: forever.

    Returns:
      The path found.

    Raises:
      TimeoutError: nothing after `timeout_s`, naming every path looked for.
    """
    began = time.monotonic()
    while True:
        for path in paths:
            if file_complete(path):
                return path
        if timeout_s is not None and time.monotonic() - began > timeout_s:
            raise TimeoutError(
                f"No selection {' or '.join(str(p) for p in paths)} after {timeout_s} s; export "
                "it from the page next to it, or wait longer (selection_timeout_s)."
            )
        time.sleep(poll_seconds)


def _parse(document: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SelectionError(f'{where} is not a kernel selection (expected "format": "{FORMAT}").')
    layers = document.get("layers")
    if not isinstance(layers, dict):
        raise SelectionError(f'{where} has no "layers" object.')
    chosen_by = document.get("chosen_by", "person")
    if not isinstance(chosen_by, str):
        raise SelectionError(f'{where}: "chosen_by" must be a string, got {chosen_by!r}.')
    fingerprint = document.get("model_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise SelectionError(f'{where}: "model_fingerprint" must be a string, got {fingerprint!r}.')
    parsed = {}
    for group, layer in layers.items():
        if not isinstance(layer, dict) or "num_kernels" not in layer or "remove" not in layer:
            raise SelectionError(
                f'{where}: layer {group!r} needs "num_kernels" and "remove", got {layer!r}.'
            )
        size = _count(group, layer["num_kernels"], where)
        parsed[group] = {
            "num_kernels": size,
            "remove": _checked(group, layer["remove"], size, where),
            "chosen_by": chosen_by,
            "model_fingerprint": fingerprint,
            "file": where,
        }
    return parsed


def _short(fingerprint: str) -> str:
    return fingerprint[:SHORT_FINGERPRINT] + ("..." if len(fingerprint) > SHORT_FINGERPRINT else "")


def _is_int(value: Any) -> bool:
    # bool is an int in Python; a kernel index of `true` is a mistake, not kernel 1.
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _count(group: str, value: Any, where: str) -> int:
    if not _is_int(value) or int(value) < 1:
        raise SelectionError(
            f'{where}: layer {group!r} has "num_kernels": {value!r}; it must be a positive '
            "integer (the layer's kernel count when the choice was made)."
        )
    return int(value)


def _checked(group: str, indices: Any, size: int, where: str) -> np.ndarray:
    # A string is a sequence too ("12" would read as kernels 1 and 2): only real lists and
    # arrays of integers are indices.
    if isinstance(indices, np.ndarray):
        values = list(indices.reshape(-1))
    elif isinstance(indices, list | tuple):
        values = list(indices)
    else:
        values = None
    if values is None or not all(_is_int(v) for v in values):
        raise SelectionError(
            f'{where}: layer {group!r} has "remove": {indices!r}; it must be a list of integer '
            f"kernel indices in [0, {size}), e.g. [3, 7]."
        )
    array = np.asarray([int(v) for v in values], dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= size):
        raise SelectionError(
            f"Layer {group!r}: kernel indices must be in [0, {size}), got {array.tolist()}."
        )
    if len(np.unique(array)) != array.size:
        raise SelectionError(f"Layer {group!r}: repeated kernel indices {array.tolist()}.")
    if array.size >= size:
        raise SelectionError(
            f"Layer {group!r}: the selection removes all {size} kernels; keep at least one."
        )
    return np.sort(array)
