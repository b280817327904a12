"""LeNet-5: two 5x5 convs with bias and max pooling, then three dense layers."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax

from jaxprune import ops
from jaxprune.models.widths import (
    FrozenWidths,
    check_num_classes,
    freeze_widths,
    resolve_widths,
)


class LeNet5(nn.Module):
    """LeNet-5 for small grey or colour images.

    conv1 5x5 (SAME, so 28x28 inputs keep their size) + ReLU + maxpool 2, conv2 5x5 (VALID) +
    ReLU + maxpool 2, flatten, fc1 + ReLU, fc2 + ReLU, head. Convs have biases; there is no
    BatchNorm and no dropout, so a training call with ``mutable=["batch_stats"]`` returns
    ``(logits, {})``.

    Attributes:
      num_classes: outputs of the logits layer ``head``.
      widths: width spec (layer path -> output features); missing layers take the defaults
        conv1=6, conv2=16, fc1=120, fc2=84, head=num_classes. Stored as sorted pairs.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`): "auto", "xla" or
        "gemm"; it changes the speed of training, not the results.
    """

    num_classes: int
    widths: Mapping[str, int] | FrozenWidths | None = None
    conv_impl: str = "auto"

    def __post_init__(self) -> None:
        # Linen fields must be hashable, so keep the spec as sorted pairs; validate it now so a
        # typo fails at construction rather than at init.
        object.__setattr__(self, "widths", freeze_widths(self.widths))
        check_num_classes(self.num_classes, "lenet5")
        self.full_widths()
        super().__post_init__()

    def default_widths(self) -> dict[str, int]:
        """Returns the full width spec of the unpruned network."""
        return {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84, "head": self.num_classes}

    def coupled_widths(self) -> tuple[tuple[str, ...], ...]:
        """Returns groups of layers that must share a width: none in a plain chain."""
        return ()

    def full_widths(self) -> dict[str, int]:
        """Returns the complete spec this module builds: defaults overridden by `widths`."""
        return resolve_widths(self.widths, self.default_widths(), model="lenet5", fixed=["head"])

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps NHWC images to logits.

        Args:
          x: images, shape (batch, height, width, channels), float32.
          train: accepted for the common call convention; LeNet-5 behaves the same either way.

        Returns:
          Logits of shape (batch, num_classes).
        """
        del train  # Nothing here depends on the mode.
        if x.ndim != 4:
            raise ValueError(f"lenet5 expects NHWC images of rank 4, got shape {x.shape}.")
        widths = self.full_widths()
        conv = functools.partial(nn.Conv, conv_general_dilated=ops.conv_impl(self.conv_impl))
        x = conv(widths["conv1"], (5, 5), padding="SAME", name="conv1")(x)
        x = ops.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = conv(widths["conv2"], (5, 5), padding="VALID", name="conv2")(x)
        x = ops.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(widths["fc1"], name="fc1")(x))
        x = nn.relu(nn.Dense(widths["fc2"], name="fc2")(x))
        return nn.Dense(widths["head"], name="head")(x)
