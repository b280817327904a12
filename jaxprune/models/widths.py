"""Width specs: the number of output features of every Conv/Dense layer, keyed by its path.

A width spec is a flat mapping such as ``{"conv1": 6, "stage2/block0/conv1": 32, "head": 10}``.
The key of a layer is the path of the params sub-dict that holds its ``"kernel"``, joined with
``"/"``; the value is the kernel's last dimension. Pruning removes output channels physically, and
a linen module refuses parameters whose shapes differ from the ones it declares, so models are
built from a spec and the spec of pruned params is read back with `widths_from_params`.

Nothing here knows about any particular model: these functions work on any flax params tree.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from jaxprune.widths import widths_from_params  # noqa: F401  (re-exported)

# Hashable form of a width spec, as stored on a linen module: sorted (path, width) pairs.
FrozenWidths = tuple[tuple[str, int], ...]


def _as_width(path: str, value: Any) -> int:
    """Validates one width: a positive integer (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"width of {path!r} must be a positive int, got {value!r} ({type(value).__name__})."
        )
    if value < 1:
        raise ValueError(
            f"width of {path!r} must be at least 1, got {value}; a layer cannot lose every "
            "output channel."
        )
    return int(value)


def check_num_classes(num_classes: Any, model: str) -> None:
    """Refuses a number of classes (the logits layer's width) that is not a positive int.

    Args:
      num_classes: the value to check.
      model: the model's name, used in the error message.

    Raises:
      ValueError: `num_classes` is not an int of at least 1.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"{model} needs an int num_classes, got {num_classes!r}.")
    if num_classes < 1:
        raise ValueError(f"{model} needs num_classes >= 1, got {num_classes}.")


def freeze_widths(
    widths: Mapping[str, int] | Iterable[tuple[str, int]] | None,
) -> FrozenWidths | None:
    """Turns a user's width spec into the hashable form that linen module fields need.

    Args:
      widths: a mapping from layer path to width, an iterable of ``(path, width)`` pairs (e.g.
        an already frozen spec), or None.

    Returns:
      Sorted ``(path, width)`` pairs with plain-int widths, or None when `widths` is None.

    Raises:
      ValueError: a key is not a string, a width is not a positive int, or a path repeats.
    """
    if widths is None:
        return None
    items = list(widths.items()) if isinstance(widths, Mapping) else list(widths)
    frozen: dict[str, int] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(
                f"a width spec is a mapping {{layer path: width}}; got the entry {item!r}."
            )
        path, value = item
        if not isinstance(path, str):
            raise ValueError(f"width spec keys are layer paths (str), got {path!r}.")
        if path in frozen:
            raise ValueError(f"layer {path!r} appears twice in the width spec.")
        frozen[path] = _as_width(path, value)
    return tuple(sorted(frozen.items()))


def resolve_widths(
    widths: Mapping[str, int] | Iterable[tuple[str, int]] | None,
    defaults: Mapping[str, int],
    *,
    model: str,
    fixed: Iterable[str] = (),
    coupled: Iterable[Iterable[str]] = (),
) -> dict[str, int]:
    """Completes a partial width spec with a model's defaults and checks it.

    Args:
      widths: the widths given by the user (any form `freeze_widths` accepts), or None.
      defaults: the model's full default spec; its keys are the only valid layer paths.
      model: the model's name, used in error messages.
      fixed: layers whose width may not change, e.g. the logits layer (num_classes outputs).
      coupled: groups of layers whose outputs meet elementwise (e.g. are added in a residual
        stage), so each group must share one width.

    Returns:
      The full spec: `defaults` overridden by `widths`, in the order of `defaults`.

    Raises:
      ValueError: `widths` names a layer the model does not have (a typo must not be silently
        ignored), holds an invalid width, changes a fixed layer, or breaks a coupling.
    """
    given = dict(freeze_widths(widths) or ())
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        hints = []
        for path in unknown:
            close = difflib.get_close_matches(path, list(defaults), n=1)
            hints.append(f"{path!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"widths for {model} name unknown layer(s): {', '.join(hints)}. "
            f"Valid layer paths are: {', '.join(defaults)}."
        )
    for path in fixed:
        if path in given and given[path] != defaults[path]:
            raise ValueError(
                f"widths[{path!r}] of {model} is {given[path]}, but that layer's width is fixed "
                f"at {defaults[path]} (for the logits layer: num_classes); drop {path!r} from the "
                "spec or change the model's configuration."
            )
    full = {path: given.get(path, default) for path, default in defaults.items()}
    for group in coupled:
        group = tuple(group)
        if len({full[path] for path in group}) > 1:
            listing = ", ".join(f"{path}={full[path]}" for path in group)
            raise ValueError(
                f"widths for {model} break a coupling: the outputs of {listing} are added "
                "together, so these layers must keep one common number of channels."
            )
    return full
