"""``--model``: a zoo name, or your own model from a file or a module.

    --model vgg_small                       the zoo model (its shipped trained weights)
    --model my_models.py:make_cnn           a function in a file
    --model mypackage.nets:make_cnn         a function in an importable module

The function is called with no arguments, or with ``input_shape=(H, W, C)`` (one example, from
the data) if it takes that keyword, and returns one of:

* ``(module, variables)``: a `flax.linen` module and its (trained) variables;
* an `nnx.Module` (its arrays are its state);
* a `flax.linen` module alone, whose variables then come from ``--variables`` (or are
  initialised at random where a command allows it, e.g. ``graph``);
* ``(jaxprune.Model, variables)``.

``--variables PATH`` reads variables from a jaxprune model file (``.msgpack``) or an orbax
checkpoint folder, checked against the model's own variable shapes.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import checkpoint
from jaxprune.commands.config import UsageError
from jaxprune.model import Model
from jaxprune.models import MODELS, build_model

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model the command line resolved.

    Attributes:
      model: how to call it.
      variables: its variables (dict of collections).
      label: how it was named on the command line.
      zoo: the zoo name, for zoo models (their pruned files are zoo model files).
      trained: whether the variables were read from a file (not initialised at random).
      meta: what the model file says about the model (how it was trained), if it came from one.
    """

    model: Model
    variables: Any
    label: str
    zoo: str | None
    trained: bool
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def add_model_arguments(parser: Any) -> None:
    """``--model``, ``--variables`` and ``--dataset``, as every command reads them."""
    parser.add_argument(
        "--model",
        default="vgg_small",
        help="a zoo model, or your own as FILE.py:NAME or package.module:NAME (NAME() returns "
        "(linen module, variables), an nnx.Module, or a linen module with --variables)",
    )
    parser.add_argument(
        "--variables", help="the model's variables: a jaxprune model file or an orbax checkpoint"
    )
    parser.add_argument("--dataset", default="fashion_mnist", help="the dataset (TFDS name)")


def shipped_file(zoo: str, dataset: str) -> Path:
    return PRETRAINED / f"{zoo}_{dataset}.msgpack"


def load_model(
    spec: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    dataset: str,
    variables_path: str | None = None,
    need_trained: bool = True,
) -> LoadedModel:
    """Resolves ``--model`` (and ``--variables``) into a model and its variables.

    Args:
      spec: a zoo name, ``FILE.py:NAME`` or ``package.module:NAME``.
      input_shape: one example's shape (no batch axis), from the data.
      num_classes: classes of the data (for zoo models built here).
      dataset: the data's name (to find a zoo model's shipped weights).
      variables_path: a model file or orbax checkpoint with the variables.
      need_trained: refuse to initialise variables at random (pruning needs a trained model).

    Raises:
      UsageError: an unknown spec, a function that returns something else, variables that do
        not fit the model, or no trained variables where they are needed.
    """
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    if ":" not in spec:
        return _zoo(spec, example, num_classes, dataset, variables_path, need_trained)
    made = _call(spec, input_shape)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], Model):
        model, variables = made
        if variables_path:
            variables = read_variables(variables_path, variables)
        return LoadedModel(model, variables, spec, None, True)
    from flax import nnx

    if isinstance(made, nnx.Module):
        model, variables = Model.nnx(made, example)
        if variables_path:
            variables = read_variables(variables_path, variables)
        return LoadedModel(model, variables, spec, None, True)
    module, variables = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not hasattr(module, "apply") or not hasattr(module, "init"):
        raise UsageError(
            f"--model {spec}: it returned a {type(module).__name__}; return (module, variables) "
            "for a flax.linen module, an nnx.Module, or (jaxprune.Model, variables)."
        )
    trained = variables is not None or variables_path is not None
    if variables is None:
        abstract = _init_shapes(module, example)
        if variables_path:
            variables = read_variables(variables_path, abstract)
        elif need_trained:
            raise UsageError(
                f"--model {spec} returned a module without variables: return (module, "
                "variables) or pass --variables FILE (a model file or an orbax checkpoint)."
            )
        else:
            variables = _init(module, example)
    elif variables_path:
        variables = read_variables(variables_path, variables)
    model = Model.linen(module, example, variables=variables)
    return LoadedModel(model, variables, spec, None, trained)


def _zoo(
    name: str,
    example: jax.ShapeDtypeStruct,
    num_classes: int,
    dataset: str,
    variables_path: str | None,
    need_trained: bool,
) -> LoadedModel:
    if name not in MODELS:
        raise UsageError(
            f"--model {name!r} is not a zoo model ({', '.join(MODELS)}); give your own as "
            "FILE.py:NAME or package.module:NAME."
        )
    path = Path(variables_path) if variables_path else shipped_file(name, dataset)
    if path.is_file() or variables_path:
        if not path.exists():
            raise UsageError(f"--variables {path} does not exist.")
        module, variables, meta = checkpoint.load_model_file(path)
        stored = _zoo_name(module)
        if stored is not None and stored != name:
            raise UsageError(
                f"--variables {path} holds a {stored}, not a {name}; pass --model {stored}."
            )
        model = Model.linen(module, example, variables=variables)
        return LoadedModel(model, variables, name, name, True, meta)
    if need_trained:
        shipped = sorted(p.name for p in PRETRAINED.glob("*.msgpack"))
        raise UsageError(
            f"no trained {name} for {dataset}: pass --variables FILE (a model file written by "
            f"`jaxprune train --export`); shipped: {shipped}."
        )
    module = build_model(name, num_classes)
    variables = _init(module, example)
    return LoadedModel(
        Model.linen(module, example, variables=variables), variables, name, name, False
    )


def _zoo_name(module: Any) -> str | None:
    """The zoo name of a module built by `build_model` (None if it is no zoo model)."""
    num_classes = getattr(module, "num_classes", None)
    widths = module.full_widths() if hasattr(module, "full_widths") else None
    for name in MODELS if num_classes is not None else ():
        try:
            if build_model(name, num_classes, widths) == module:
                return name
        except (ValueError, TypeError):
            continue
    return None


def _call(spec: str, input_shape: tuple[int, ...]) -> Any:
    where, _, attribute = spec.rpartition(":")
    if not attribute:
        raise UsageError(f"--model {spec}: name the function after the colon (FILE.py:NAME).")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"--model {spec}: {path} does not exist.")
        module_name = f"jaxprune_user_model_{path.stem}"
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module  # dataclasses (flax modules) look themselves up
        spec_obj.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise UsageError(f"--model {spec}: cannot import {where} ({error}).") from error
    if not hasattr(module, attribute):
        names = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UsageError(f"--model {spec}: {where} has no {attribute!r}; it has {names}.")
    factory = getattr(module, attribute)
    if not callable(factory):
        raise UsageError(f"--model {spec}: {attribute} is not a function.")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "input_shape" in parameters:
        return factory(input_shape=tuple(input_shape))
    return factory()


def _init_shapes(module: Any, example: jax.ShapeDtypeStruct) -> Any:
    call = Model.linen(module, example)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, **call.eval_kwargs), example)


def _init(module: Any, example: jax.ShapeDtypeStruct) -> Any:
    call = Model.linen(module, example)
    x = jnp.zeros(example.shape, example.dtype)
    return jax.jit(lambda k: module.init({"params": k, "dropout": k}, x, **call.eval_kwargs))(
        jax.random.key(0)
    )


def read_variables(path: str | Path, target: Any) -> Any:
    """Variables of a model from a model file or an orbax checkpoint, checked against
    `target` (the model's variables or their shapes).

    Raises:
      UsageError: no such file, or arrays that do not fit the model (named).
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--variables {path} does not exist.")
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), dict(target)
    )
    if path.is_file():
        return checkpoint.load_variables(path, target)
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(path.absolute(), target)
    except Exception as error:  # orbax raises assorted types for other trees
        raise UsageError(
            f"--variables {path}: the checkpoint does not hold this model's variables "
            f"({type(error).__name__}: {str(error)[:200]})."
        ) from error
    return dict(restored) if isinstance(restored, Mapping) else restored
