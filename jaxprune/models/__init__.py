"""The model zoo: plain flax.linen CNNs built from a width spec, and a registry by name.

Every model maps NHWC float32 images to logits and follows one call convention::

  logits = model.apply(variables, x, train=False)
  logits, updates = model.apply(
      variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})

``updates`` holds the new ``batch_stats`` of models with BatchNorm and is ``{}`` for the others.
A width spec maps each Conv/Dense layer's params path (e.g. ``"stage2/block0/conv1"``) to its
output features; `widths_from_params` reads it back from (pruned) params, and
``build_model(name, num_classes, widths)`` builds the matching module.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = build_model("lenet5", num_classes=10, widths={"conv1": 4})
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  >>> widths_from_params(params)["conv1"]
  4
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import flax.linen as nn

from jaxprune.models.lenet import LeNet5
from jaxprune.models.resnet import BasicBlock, BlockLayout, ResNet, ResNetStage, resnet20, resnet56
from jaxprune.models.vgg import VGG, vgg16, vgg16_bn, vgg_small, vgg_small_plain
from jaxprune.models.widths import FrozenWidths, freeze_widths, resolve_widths, widths_from_params

ModelConstructor = Callable[..., nn.Module]

# name -> constructor(num_classes, widths=None); read-only so no caller can change the zoo.
MODELS: Mapping[str, ModelConstructor] = types.MappingProxyType(
    {
        "lenet5": LeNet5,
        "vgg_small": vgg_small,
        "vgg_small_plain": vgg_small_plain,
        "vgg16_bn": vgg16_bn,
        "vgg16": vgg16,
        "resnet20": resnet20,
        "resnet56": resnet56,
    }
)


def _constructor(name: str) -> ModelConstructor:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models are: {', '.join(MODELS)}.")
    return MODELS[name]


def build_model(
    name: str,
    num_classes: int,
    widths: Mapping[str, int] | None = None,
    *,
    conv_impl: str = "auto",
) -> nn.Module:
    """Builds a zoo model by name.

    Args:
      name: one of `MODELS`: lenet5, vgg_small, vgg_small_plain, vgg16_bn, vgg16, resnet20,
        resnet56.
      num_classes: outputs of the logits layer.
      widths: optional (partial) width spec, e.g. ``widths_from_params(pruned_params)``;
        missing layers keep their default width.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`: "auto", "xla",
        "gemm"); it changes the speed of training, not the results.

    Returns:
      The unbound linen module.

    Raises:
      ValueError: unknown name, or a spec naming a layer the model lacks, holding a
        non-positive width, or breaking a residual coupling.
    """
    return _constructor(name)(num_classes=num_classes, widths=widths, conv_impl=conv_impl)


def default_widths(name: str, num_classes: int) -> dict[str, int]:
    """Returns the full width spec of an unpruned zoo model, without initialising it.

    Args:
      name: one of `MODELS`.
      num_classes: outputs of the logits layer (the spec's ``"head"`` entry).

    Returns:
      Layer path -> output features, for every Conv and Dense layer.
    """
    return build_model(name, num_classes).default_widths()


# A function from a width spec to the apply function of the model with those widths.
Rebuild = Callable[[Mapping[str, int]], Callable[..., object]]


def rebuild_fn(model: str | Rebuild, num_classes: int) -> Rebuild:
    """How a method rebuilds a model after changing its widths.

    Args:
      model: a zoo model name, or a user's own ``rebuild(widths) -> apply_fn``.
      num_classes: outputs of the logits layer (for a zoo name).

    Returns:
      ``rebuild(widths) -> apply_fn``: for a zoo name, ``build_model(name, num_classes,
      widths).apply``; a callable is returned as it is.

    Raises:
      ValueError: an unknown zoo name, or neither a name nor a callable.
    """
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(
                f"Unknown zoo model {model!r}; known: {', '.join(MODELS)}. For your own model "
                "pass rebuild(widths) -> apply_fn instead of a name."
            )
        return lambda widths: build_model(model, num_classes, widths).apply
    if not callable(model):
        raise ValueError(
            "model must be a zoo model name or a callable rebuild(widths) -> apply_fn, got "
            f"{type(model).__name__}."
        )
    return model


__all__ = [
    "Rebuild",
    "MODELS",
    "VGG",
    "BasicBlock",
    "BlockLayout",
    "FrozenWidths",
    "LeNet5",
    "ResNet",
    "ResNetStage",
    "build_model",
    "default_widths",
    "rebuild_fn",
    "freeze_widths",
    "resolve_widths",
    "resnet20",
    "resnet56",
    "vgg16",
    "vgg16_bn",
    "vgg_small",
    "vgg_small_plain",
    "widths_from_params",
]
