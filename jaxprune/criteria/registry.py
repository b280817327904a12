"""Criteria by name: ``get_criterion("taylor")`` builds one; `register` adds a user's own.

The built-in names cannot be replaced, so a name always means the same formula.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

from jaxprune.criteria import activations, oracle, randomized, taylor, weights
from jaxprune.criteria.base import Criterion

Constructor = Callable[..., Criterion]

_BUILT_IN: dict[str, Constructor] = {
    "l1": weights.l1_norm,
    "l2": weights.l2_norm,
    "min_weight": weights.mean_squared_weight,
    "fpgm": weights.fpgm,
    "fermat": weights.fermat,
    "bn_gamma": weights.bn_gamma,
    "bn_beta": weights.bn_beta,
    "activation_mean": activations.activation_mean,
    "activation_std": activations.activation_std,
    "apoz": activations.apoz,
    "entropy": activations.entropy,
    "hrank": activations.hrank,
    "mutual_info": activations.mutual_info,
    "taylor": taylor.taylor,
    "taylor_abs_then_mean": functools.partial(taylor.taylor, variant="abs_then_mean"),
    "taylor_signed_sum": functools.partial(taylor.taylor, variant="signed_sum"),
    "taylor_bn_gamma": taylor.taylor_bn_gamma,
    "taylor_bn_beta": taylor.taylor_bn_beta,
    "taylor_weight_l1": taylor.taylor_weight_l1,
    "taylor_weight_l2": taylor.taylor_weight_l2,
    "oracle_loss": oracle.oracle_loss,
    "oracle_abs": oracle.oracle_abs,
    "random": randomized.random_scores,
}
_REGISTRY: dict[str, Constructor] = dict(_BUILT_IN)

# name -> constructor(**options); a read-only view (use `register` to add a criterion).
CRITERIA: Mapping[str, Constructor] = types.MappingProxyType(_REGISTRY)


def get_criterion(name: str, **options: Any) -> Criterion:
    """Builds the criterion registered under `name`.

    Args:
      name: a key of `CRITERIA`.
      **options: passed to its constructor (e.g. ``bins=8`` for "entropy", ``seed=1`` for
        "random", ``batch_size=32`` for the oracles).

    Returns:
      The criterion.

    Raises:
      KeyError: an unknown name; the message lists the known ones.
      TypeError: an option the constructor does not take.
    """
    if name not in _REGISTRY:
        raise KeyError(
            f"Unknown criterion {name!r}. Known criteria: {', '.join(sorted(_REGISTRY))}. "
            "Add your own with jaxprune.criteria.register(name, constructor)."
        )
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        raise TypeError(f"Criterion {name!r} does not take options {sorted(options)}: {e}") from e


def register(name: str, constructor: Constructor) -> None:
    """Adds a criterion under a new name.

    Args:
      name: the new name (not a built-in, not already registered).
      constructor: a function of keyword options returning a `Criterion`.

    Raises:
      ValueError: the name is taken, or the constructor is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A criterion name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY:
        raise ValueError(
            f"A criterion named {name!r} is already registered; choose another name "
            "(built-in criteria cannot be replaced)."
        )
    if not callable(constructor):
        raise ValueError(f"register({name!r}, ...) needs a callable returning a Criterion.")
    _REGISTRY[name] = constructor
