"""Kernel selections: which kernels of which layers a person (or a stand-in) chose to remove.

The kernel-selection page (`jaxprune inspect`) exports one, and `jaxprune prune --method
progressive --criterion subjective --selection FILE` replays it. The file is JSON:

    {"format": "jaxprune-kernel-selection/1",
     "chosen_by": "person",                 # or "stand-in:<rule>" for a scripted choice
     "model_fingerprint": "<sha256>",       # optional: the model the choice was made on
     "layers": {"<group>": {"num_kernels": 32, "remove": [3, 7, 12]}, ...}}

Indices count the layer's kernels as the page showed them, i.e. in the layer's current width. A
directory of such files (one per layer, any names) reads as their union.

``model_fingerprint`` is `jaxprune.checkpoint.tree_fingerprint` of the variables the page was
made from (`model_fingerprint` here). Indices mean nothing on another model, so `check_against`
refuses a file whose fingerprint is not one of the model's; a file without one (written by a
script) is taken on trust.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "jaxprune-kernel-selection/1"
# Hex digits of a fingerprint shown in messages and on the page (the file keeps all 64).
SHORT_FINGERPRINT = 16


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
    # Imported here: the file format itself needs no checkpoint machinery.
    from jaxprune.checkpoint import tree_fingerprint

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
      SelectionError: an index out of range, a repeated index, a layer without a kernel count, or
        a choice that would remove every kernel of a layer.
    """
    layers = {}
    for group, indices in removals.items():
        if group not in num_kernels:
            raise SelectionError(
                f"No kernel count for layer {group!r}; pass num_kernels[{group!r}]."
            )
        layers[group] = {
            "num_kernels": int(num_kernels[group]),
            "remove": _checked(group, indices, int(num_kernels[group])).tolist(),
        }
    document: dict[str, Any] = {"format": FORMAT, "chosen_by": chosen_by}
    if model_fingerprint is not None:
        document["model_fingerprint"] = str(model_fingerprint)
    document["layers"] = layers
    return document


def write_selection(path: str | Path, document: Mapping[str, Any]) -> Path:
    """Writes a selection document as JSON (validated first: see `read_selection`)."""
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
      SelectionError: a file that is not a selection, indices out of range or repeated, or one
        layer chosen in two files.
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


def _parse(document: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SelectionError(f'{where} is not a kernel selection (expected "format": "{FORMAT}").')
    layers = document.get("layers")
    if not isinstance(layers, dict):
        raise SelectionError(f'{where} has no "layers" object.')
    chosen_by = str(document.get("chosen_by", "person"))
    fingerprint = document.get("model_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise SelectionError(f'{where}: "model_fingerprint" must be a string, got {fingerprint!r}.')
    parsed = {}
    for group, layer in layers.items():
        if not isinstance(layer, dict) or "num_kernels" not in layer or "remove" not in layer:
            raise SelectionError(
                f'{where}: layer {group!r} needs "num_kernels" and "remove", got {layer!r}.'
            )
        size = int(layer["num_kernels"])
        parsed[group] = {
            "num_kernels": size,
            "remove": _checked(group, layer["remove"], size),
            "chosen_by": chosen_by,
            "model_fingerprint": fingerprint,
            "file": where,
        }
    return parsed


def _short(fingerprint: str) -> str:
    return fingerprint[:SHORT_FINGERPRINT] + ("..." if len(fingerprint) > SHORT_FINGERPRINT else "")


def _checked(group: str, indices: Sequence[int], size: int) -> np.ndarray:
    values = np.asarray(list(indices), dtype=np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= size):
        raise SelectionError(
            f"Layer {group!r}: kernel indices must be in [0, {size}), got {values.tolist()}."
        )
    if len(np.unique(values)) != values.size:
        raise SelectionError(f"Layer {group!r}: repeated kernel indices {values.tolist()}.")
    if values.size >= size:
        raise SelectionError(
            f"Layer {group!r}: the selection removes all {size} kernels; keep at least one."
        )
    return np.sort(values)
