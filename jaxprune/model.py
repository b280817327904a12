"""How jaxprune calls your model: `Model`, an apply function with its example input and the
keywords of its evaluation and training calls.

Every method, the training loop and the command line take a `Model`, so nothing assumes a zoo
model, a flag named ``train`` or a collection named ``batch_stats``:

* `Model.linen(module, x)` for a `flax.linen` module: the train flag is found in the signature
  of its ``__call__`` (``train``, ``training``, ``is_training``, or ``deterministic`` and
  ``use_running_average`` inverted), and every collection besides ``params`` that the module
  has (BatchNorm statistics) is updated in training;
* `Model.nnx(module, x)` for a Flax NNX module: its state is split into linen-like
  collections (``{"params": ..., "batch_stats": ..., ...}`` by variable type, keyed by module
  path), with ``train`` choosing the module's ``train()`` or ``eval()`` mode;
* `Model(apply_fn, x, ...)` for any function of ``(variables, x, **kwargs)``.

Variables are always a dict of collections whose ``"params"`` are trained. A pruned model is the
same `Model` with the pruned program as its apply function (`Model.with_apply_fn`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Variables = dict[str, Any]

# Names of a linen module's train flag, and whether True means "training".
_TRAIN_FLAGS = {
    "train": True,
    "training": True,
    "is_training": True,
    "deterministic": False,
    "use_running_average": False,
}


def _frozen(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    return None if mapping is None else tuple(sorted(dict(mapping).items()))


@dataclasses.dataclass(frozen=True)
class Model:
    """A model as jaxprune calls it.

    Attributes:
      apply_fn: ``apply_fn(variables, x, **kwargs)``; `variables` is a dict of collections.
      example_input: the shape and dtype of one input batch (`jax.ShapeDtypeStruct`).
      eval_call: keyword arguments of an evaluation call, as sorted (name, value) pairs.
      train_call: keyword arguments of a training call (None: the same as `eval_call`).
      mutable: collections a training call updates and returns (flax's ``mutable=``).
      rng_streams: random streams a training call needs (passed as ``rngs={name: key}``).
      name: a label for logs and reports.
    """

    apply_fn: Callable[..., Any]
    example_input: jax.ShapeDtypeStruct
    eval_call: tuple[tuple[str, Any], ...] = ()
    train_call: tuple[tuple[str, Any], ...] | None = None
    mutable: tuple[str, ...] = ()
    rng_streams: tuple[str, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if not callable(self.apply_fn):
            raise TypeError(f"Model.apply_fn must be callable, got {type(self.apply_fn).__name__}.")
        x = self.example_input
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(
                "Model.example_input must be an array or jax.ShapeDtypeStruct (one input batch), "
                f"got {type(x).__name__}."
            )
        object.__setattr__(self, "example_input", jax.ShapeDtypeStruct(np.shape(x), x.dtype))

    # -- constructors

    @classmethod
    def linen(
        cls,
        module: Any,
        example_input: Any,
        *,
        eval_kwargs: Mapping[str, Any] | None = None,
        train_kwargs: Mapping[str, Any] | None = None,
        mutable: Sequence[str] | None = None,
        variables: Variables | None = None,
        rng_streams: Sequence[str] = ("dropout",),
    ) -> Model:
        """A `flax.linen` module.

        Args:
          module: the module.
          example_input: one input batch (or its `jax.ShapeDtypeStruct`).
          eval_kwargs, train_kwargs: the call keywords; by default the train flag found in
            the signature of ``module.__call__`` set for evaluation and training.
          mutable: collections updated in training; default: every collection of `variables`
            other than ``params`` (none when `variables` is not given).
          variables: the module's variables, to find its collections.
          rng_streams: random streams for training (dropout).
        """
        return cls.from_apply(
            module.apply,
            example_input,
            train_flag=train_flag(module.__call__),
            eval_kwargs=eval_kwargs,
            train_kwargs=train_kwargs,
            mutable=mutable,
            variables=variables,
            rng_streams=rng_streams,
            name=type(module).__name__,
        )

    @classmethod
    def from_apply(
        cls,
        apply_fn: Callable[..., Any],
        example_input: Any,
        *,
        train_flag: str | None = None,
        eval_kwargs: Mapping[str, Any] | None = None,
        train_kwargs: Mapping[str, Any] | None = None,
        mutable: Sequence[str] | None = None,
        variables: Variables | None = None,
        rng_streams: Sequence[str] = ("dropout",),
        name: str | None = None,
    ) -> Model:
        """Any ``apply_fn(variables, x, **kwargs)`` following flax's calling convention.

        Args:
          apply_fn: the function.
          example_input: one input batch (or its `jax.ShapeDtypeStruct`).
          train_flag: the name of its train flag, if any (``"train"``; ``"deterministic"``
            and ``"use_running_average"`` are inverted).
          eval_kwargs, train_kwargs, mutable, variables, rng_streams: as for `linen`.
          name: a label for logs.
        """
        if train_flag is not None and train_flag not in _TRAIN_FLAGS:
            raise ValueError(
                f"train_flag={train_flag!r} is not one of {sorted(_TRAIN_FLAGS)}; pass "
                "eval_kwargs= and train_kwargs= instead."
            )
        if eval_kwargs is None:
            eval_kwargs = {} if train_flag is None else {train_flag: not _TRAIN_FLAGS[train_flag]}
        if train_kwargs is None:
            train_kwargs = {} if train_flag is None else {train_flag: _TRAIN_FLAGS[train_flag]}
        if mutable is None:
            mutable = [c for c in (variables or {}) if c not in ("params", "masks")]
        return cls(
            apply_fn,
            example_input,
            _frozen(eval_kwargs) or (),
            _frozen(train_kwargs),
            tuple(mutable),
            tuple(rng_streams),
            name or getattr(apply_fn, "__name__", "model"),
        )

    @classmethod
    def nnx(cls, module: Any, example_input: Any) -> tuple[Model, Variables]:
        """A Flax NNX module, as a model and its variables (linen-like collections).

        The module is not modified; ``train=True`` runs it in its ``train()`` mode.

        Returns:
          ``(model, variables)``.
        """
        from jaxprune.nnx import as_apply

        apply_fn, variables = as_apply(module)
        mutable = tuple(c for c in variables if c != "params")
        model = cls(
            apply_fn,
            example_input,
            (("train", False),),
            (("train", True),),
            mutable,
            (),
            type(module).__name__,
        )
        return model, variables

    # -- calls

    @property
    def eval_kwargs(self) -> dict[str, Any]:
        return dict(self.eval_call)

    @property
    def train_kwargs(self) -> dict[str, Any]:
        return dict(self.eval_call if self.train_call is None else self.train_call)

    def __call__(self, variables: Variables, x: Any) -> Any:
        """The evaluation call: the model's output (logits)."""
        return self.apply_fn(variables, x, **self.eval_kwargs)

    def train_apply(self, variables: Variables, x: Any, rng: jax.Array) -> tuple[Any, Variables]:
        """The training call: ``(output, updated collections)``.

        Args:
          variables: all collections.
          x: an input batch.
          rng: a key for this step's random streams (dropout).
        """
        kwargs = self.train_kwargs
        if self.rng_streams:
            keys = jax.random.split(rng, len(self.rng_streams))
            kwargs["rngs"] = dict(zip(self.rng_streams, keys, strict=True))
        if not self.mutable:
            return self.apply_fn(variables, x, **kwargs), {}
        output, updates = self.apply_fn(variables, x, mutable=list(self.mutable), **kwargs)
        return output, dict(updates)

    def with_apply_fn(self, apply_fn: Callable[..., Any]) -> Model:
        """The same model running `apply_fn` (a pruned program, a gated model) with the same
        calls."""
        return dataclasses.replace(self, apply_fn=apply_fn)


def train_flag(call: Callable[..., Any]) -> str | None:
    """The name of a module call's train flag, if it has one of the usual names."""
    try:
        parameters = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return None
    for name in _TRAIN_FLAGS:
        if name in parameters:
            return name
    return None
