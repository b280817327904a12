"""Pretrained VGG-16 weights from files a user has, into the zoo's "vgg16" (nothing downloaded).

Molchanov et al. and Osaku et al. prune an ImageNet-trained VGG-16. Two published formats are
read:

- safetensors with the PyTorch layout, as torchvision's ``vgg16`` state dict (``features.N``
  convs, ``classifier.0/3/6`` dense layers) or timm's ``vgg16`` (``features.N``,
  ``pre_logits.fc1/fc2`` as 7x7 and 1x1 convolutions, ``head.fc``);
- Keras HDF5 weights (``keras.applications.VGG16``: ``block1_conv1`` .. ``block5_conv3``,
  ``fc1``, ``fc2``, ``predictions``), the setting of Osaku et al.'s code.

PyTorch kernels are (out, in, kh, kw) and are transposed to (kh, kw, in, out); PyTorch flattens
the last feature map as (channels, height, width), jaxprune's NHWC model as (height, width,
channels), so the first dense layer's rows are permuted. Keras (channels-last) kernels are
used as they are. The widths are read from the file: a narrower or otherwise re-sized VGG-16
of the same layout loads too. The images must be preprocessed as the weights expect
(torchvision: RGB in [0, 1] normalised by the ImageNet mean and std; Keras VGG16: BGR minus the
ImageNet mean pixel); jaxprune's data pipeline does not do that for you.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.models.vgg import VGG, VGG16_STAGES, vgg16

CONVS = sum(len(stage) for stage in VGG16_STAGES)  # 13
# The dense layers of each PyTorch layout, in order: fc1, fc2, head.
_TORCH_DENSE = {
    "torchvision": ("classifier.0", "classifier.3", "classifier.6"),
    "timm": ("pre_logits.fc1", "pre_logits.fc2", "head.fc"),
}
_KERAS_CONVS = tuple(
    f"block{stage + 1}_conv{index + 1}"
    for stage, widths in enumerate(VGG16_STAGES)
    for index in range(len(widths))
)
_KERAS_DENSE = ("fc1", "fc2", "predictions")


class WeightsFormatError(ValueError):
    """A weights file that is not the VGG-16 layout it was read as (the problem is named)."""


def vgg16_from_safetensors(path: str | os.PathLike) -> tuple[VGG, dict[str, Any]]:
    """A zoo VGG-16 and its variables from a PyTorch-layout safetensors file.

    Args:
      path: a ``.safetensors`` file of torchvision's or timm's ``vgg16`` (ImageNet or
        fine-tuned; the class count and the widths are read from it).

    Returns:
      (the module, ``{"params": ...}``), ready for ``module.apply(variables, x)`` on NHWC
      images of 224x224 (any size whose last feature map is 7x7).

    Raises:
      WeightsFormatError: a missing or misshapen tensor, or a VGG with BatchNorm (``vgg16_bn``:
        not a zoo model).
    """
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    return _from_torch(tensors, Path(path).name)


def _from_torch(tensors: Mapping[str, np.ndarray], source: str) -> tuple[VGG, dict[str, Any]]:
    if any(name.endswith("running_mean") for name in tensors):
        raise WeightsFormatError(
            f"{source} holds BatchNorm statistics (a vgg16_bn); jaxprune's 'vgg16' is the "
            "original VGG-16 without BatchNorm. Convert a plain vgg16 instead."
        )
    layout = next((k for k, names in _TORCH_DENSE.items() if f"{names[0]}.weight" in tensors), None)
    if layout is None:
        expected = " or ".join(f"'{names[0]}.weight'" for names in _TORCH_DENSE.values())
        raise WeightsFormatError(
            f"{source} is not a torchvision or timm vgg16: it has no {expected}."
        )
    indices = sorted(
        int(m.group(1)) for name in tensors if (m := re.fullmatch(r"features\.(\d+)\.weight", name))
    )
    if len(indices) != CONVS:
        raise WeightsFormatError(
            f"{source} has {len(indices)} convolutions under 'features'; VGG-16 has {CONVS}."
        )
    params: dict[str, Any] = {}
    for number, index in enumerate(indices, start=1):
        kernel = _tensor(tensors, f"features.{index}.weight", source, ndim=4)
        params[f"conv{number}"] = {
            "kernel": np.transpose(kernel, (2, 3, 1, 0)),
            "bias": _tensor(tensors, f"features.{index}.bias", source, ndim=1),
        }
    channels = params[f"conv{CONVS}"]["kernel"].shape[-1]
    dense = _TORCH_DENSE[layout]
    for name, prefix in zip(("fc1", "fc2", "head"), dense, strict=True):
        weight = _tensor(tensors, f"{prefix}.weight", source)
        if name == "fc1":
            # (out, channels * 7 * 7) in (c, h, w) order, or timm's (out, channels, 7, 7) conv.
            if weight.size != weight.shape[0] * channels * 49:
                raise WeightsFormatError(
                    f"{source}: {prefix}.weight has shape {weight.shape}; after {channels} "
                    f"channels of 7x7 a VGG-16's first dense layer reads {channels * 49} inputs."
                )
            grid = weight.reshape(weight.shape[0], channels, 7, 7)
            kernel = np.transpose(grid, (2, 3, 1, 0)).reshape(-1, weight.shape[0])
        else:
            kernel = weight.reshape(weight.shape[0], -1).T  # timm's 1x1 conv is a dense layer
        params[name] = {"kernel": kernel, "bias": _tensor(tensors, f"{prefix}.bias", source)}
    return _module(params, source)


def vgg16_from_keras(path: str | os.PathLike) -> tuple[VGG, dict[str, Any]]:
    """A zoo VGG-16 and its variables from Keras HDF5 weights (``keras.applications.VGG16``).

    Reads the Keras 2 weights layout (``model.save_weights("x.h5")`` and the published
    ``vgg16_weights_tf_dim_ordering_tf_kernels.h5``): one group per layer, its
    ``weight_names`` attribute listing ``kernel`` and ``bias``.

    Args:
      path: the ``.h5`` file (with the dense layers: ``include_top=True``).

    Returns:
      (the module, ``{"params": ...}``).

    Raises:
      WeightsFormatError: a missing layer or a misshapen tensor.
    """
    import h5py

    source = Path(path).name
    with h5py.File(path, "r") as file:
        root = file["model_weights"] if "model_weights" in file else file
        tensors = {}
        for layer in (*_KERAS_CONVS, *_KERAS_DENSE):
            if layer not in root:
                raise WeightsFormatError(
                    f"{source} has no layer {layer!r}; a Keras VGG16 with include_top=True has "
                    f"{', '.join((*_KERAS_CONVS, *_KERAS_DENSE))}."
                )
            group = root[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            for position, name in enumerate(names):
                tensors[f"{layer}.{_keras_kind(name, position)}"] = np.asarray(group[name])
    params: dict[str, Any] = {}
    for number, layer in enumerate(_KERAS_CONVS, start=1):
        params[f"conv{number}"] = {
            "kernel": _tensor(tensors, f"{layer}.kernel", source, ndim=4),
            "bias": _tensor(tensors, f"{layer}.bias", source, ndim=1),
        }
    for name, layer in zip(("fc1", "fc2", "head"), _KERAS_DENSE, strict=True):
        params[name] = {
            "kernel": _tensor(tensors, f"{layer}.kernel", source, ndim=2),
            "bias": _tensor(tensors, f"{layer}.bias", source, ndim=1),
        }
    return _module(params, source)


def _keras_kind(name: str, position: int) -> str:
    """ "kernel" or "bias" for a Keras weight name: ``block1_conv1/kernel:0`` (Keras 2),
    ``block1_conv1_W_1:0`` (the first published VGG16 files), else by position (kernel first)."""
    last = name.rsplit("/", 1)[-1]
    if "kernel" in last or re.search(r"_W(_\d+)?:\d+$", last):
        return "kernel"
    if "bias" in last or re.search(r"_b(_\d+)?:\d+$", last):
        return "bias"
    return "kernel" if position == 0 else "bias"


def _tensor(
    tensors: Mapping[str, np.ndarray], name: str, source: str, ndim: int | None = None
) -> np.ndarray:
    if name not in tensors:
        raise WeightsFormatError(f"{source} has no tensor {name!r}.")
    value = np.asarray(tensors[name], np.float32)
    if ndim is not None and value.ndim != ndim:
        raise WeightsFormatError(
            f"{source}: {name!r} has shape {value.shape}; a VGG-16 has a {ndim}-D tensor there."
        )
    return value


def _module(params: dict[str, Any], source: str) -> tuple[VGG, dict[str, Any]]:
    """The zoo VGG-16 whose widths are those of `params`, checked layer by layer."""
    widths = {name: int(layer["kernel"].shape[-1]) for name, layer in params.items()}
    num_classes = widths.pop("head")
    module = vgg16(num_classes, widths)
    previous = None
    for name in [f"conv{i}" for i in range(1, CONVS + 1)] + ["fc1", "fc2", "head"]:
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        if bias.shape != (kernel.shape[-1],):
            raise WeightsFormatError(
                f"{source}: {name} has {kernel.shape[-1]} outputs but a bias of shape {bias.shape}."
            )
        inputs = kernel.shape[-2] if kernel.ndim == 4 else kernel.shape[0]
        expected = previous if name != "fc1" else previous * 49
        if name != "conv1" and inputs != expected:
            raise WeightsFormatError(
                f"{source}: {name} reads {inputs} inputs but the layer before gives {expected}; "
                "the file is not a VGG-16 with a 7x7 last feature map."
            )
        previous = kernel.shape[-1]
    return module, {"params": params}
