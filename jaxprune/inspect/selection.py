"""Kernel selections: which kernels of which layers a person (or a stand-in) chose to remove.

The kernel-selection page (`jaxprune inspect`) exports one, and `jaxprune prune --method
progressive --criterion subjective --selection FILE` replays it. The file is JSON:

    {"format": "jaxprune-kernel-selection/1",
     "chosen_by": "person",                 # or "stand-in:<rule>" for a scripted choice
     "layers": {"<group>": {"num_kernels": 32, "remove": [3, 7, 12]}, ...}}

Indices count the layer's kernels as the page showed them, i.e. in the layer's current width. A
directory of such files (one per layer, any names) reads as their union.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "jaxprune-kernel-selection/1"


class SelectionError(ValueError):
    """A selection file that cannot be used as it is."""


def selection_document(
    removals: Mapping[str, Sequence[int]],
    num_kernels: Mapping[str, int],
    *,
    chosen_by: str = "person",
) -> dict[str, Any]:
    """The JSON document of a selection.

    Args:
      removals: group name -> indices of the kernels to remove.
      num_kernels: group name -> the layer's kernel count when the choice was made.
      chosen_by: "person", or "stand-in:<rule>" when a script chose.

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
    return {"format": FORMAT, "chosen_by": chosen_by, "layers": layers}


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
      group -> ``{"num_kernels": int, "remove": np.ndarray of int, "chosen_by": str}``.

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


def check_against(layers: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int]) -> None:
    """Checks that a selection fits a model's current layer widths.

    Args:
      layers: what `read_selection` returned.
      sizes: group name -> current number of kernels (e.g. ``{g: graph[g].size ...}``).

    Raises:
      SelectionError: a layer the model does not have, or one whose width changed since the
        choice was made (its indices would point at other kernels).
    """
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
        }
    return parsed


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
