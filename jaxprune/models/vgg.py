"""VGG networks: stages of 3x3 convs closed by 2x2 max pooling, then dense layers.

Four configurations are provided: `vgg_small` (32-32-64-64-128-128, for 28x28 images),
`vgg_small_plain` (the same without BatchNorm),
`vgg16_bn` (the CIFAR VGG-16 with BatchNorm and one 512-wide dense layer) and `vgg16` (the
original ImageNet VGG-16 of Simonyan & Zisserman: biases, no BatchNorm, two 4096-wide dense
layers with dropout).
"""

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

# Conv widths of VGG-16, one tuple per stage; every stage ends with a 2x2 max pool.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG_SMALL_STAGES = ((32, 32), (64, 64), (128, 128))

# He-normal keeps the activation variance through ReLU layers; without it the 13 bias-only convs
# of plain VGG-16 shrink the signal by half per layer.
_relu_init = nn.initializers.he_normal()


class VGG(nn.Module):
    """A VGG network built from a width spec.

    Layers are named ``conv1``..``convN`` (with ``bn1``..``bnN`` when `batch_norm`), ``fc1``..
    ``fcK`` for the hidden dense layers and ``head`` for the logits. Each conv is 3x3, stride 1,
    padding 1, followed by BatchNorm (then the conv has no bias) and ReLU; each stage ends with a
    2x2 max pool of stride 2. Hidden dense layers are followed by ReLU and, when
    `dropout_rate` > 0, dropout (active only with ``train=True``, which then needs a
    ``"dropout"`` rng).

    Attributes:
      num_classes: outputs of the logits layer ``head``.
      stages: default conv widths, one tuple per stage.
      hidden: default widths of the dense layers between the flattened features and the head.
      batch_norm: whether every conv is followed by BatchNorm (momentum 0.9, epsilon 1e-5).
      dropout_rate: dropout after each hidden dense layer; 0 disables it.
      pool_padding: ``"VALID"`` floors odd sizes (7 -> 3), as the usual floor-mode pooling;
        ``"SAME"`` rounds them up (7 -> 4) so that five pools still leave 1x1 of a 28x28 input.
        Both agree on even sizes, e.g. every pool of a 32x32 or 224x224 input.
      widths: width spec (layer path -> output features); missing layers take the defaults.
        Stored as sorted pairs.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`): "auto", "xla" or
        "gemm"; it changes the speed of training, not the results.
    """

    num_classes: int
    stages: tuple[tuple[int, ...], ...] = VGG_SMALL_STAGES
    hidden: tuple[int, ...] = (512,)
    batch_norm: bool = True
    dropout_rate: float = 0.0
    pool_padding: str = "VALID"
    widths: Mapping[str, int] | FrozenWidths | None = None
    conv_impl: str = "auto"

    def __post_init__(self) -> None:
        # Linen fields must be hashable, so keep the spec as sorted pairs; validate it now so a
        # typo fails at construction rather than at init.
        object.__setattr__(self, "widths", freeze_widths(self.widths))
        check_num_classes(self.num_classes, "VGG")
        if self.pool_padding not in ("VALID", "SAME"):
            raise ValueError(
                f"VGG pool_padding must be 'VALID' or 'SAME', got {self.pool_padding!r}."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"VGG dropout_rate must lie in [0, 1), got {self.dropout_rate}.")
        self.full_widths()
        super().__post_init__()

    def default_widths(self) -> dict[str, int]:
        """Returns the full width spec of the unpruned network."""
        convs = [width for stage in self.stages for width in stage]
        widths = {f"conv{i}": width for i, width in enumerate(convs, start=1)}
        widths.update({f"fc{i}": width for i, width in enumerate(self.hidden, start=1)})
        widths["head"] = self.num_classes
        return widths

    def coupled_widths(self) -> tuple[tuple[str, ...], ...]:
        """Returns groups of layers that must share a width: none in a plain chain."""
        return ()

    def full_widths(self) -> dict[str, int]:
        """Returns the complete spec this module builds: defaults overridden by `widths`."""
        return resolve_widths(self.widths, self.default_widths(), model="VGG", fixed=["head"])

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps NHWC images to logits.

        Args:
          x: images, shape (batch, height, width, channels), float32.
          train: BatchNorm uses batch statistics (and updates ``batch_stats``) and dropout is
            active when True; running averages and no dropout when False.

        Returns:
          Logits of shape (batch, num_classes).
        """
        if x.ndim != 4:
            raise ValueError(f"VGG expects NHWC images of rank 4, got shape {x.shape}.")
        widths = self.full_widths()
        conv = functools.partial(nn.Conv, conv_general_dilated=ops.conv_impl(self.conv_impl))
        index = 0
        for stage in self.stages:
            for _ in stage:
                index += 1
                x = conv(
                    widths[f"conv{index}"],
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    use_bias=not self.batch_norm,
                    kernel_init=_relu_init,
                    name=f"conv{index}",
                )(x)
                if self.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train,
                        momentum=0.9,
                        epsilon=1e-5,
                        name=f"bn{index}",
                    )(x)
                x = nn.relu(x)
            x = ops.max_pool(x, (2, 2), strides=(2, 2), padding=self.pool_padding)
        x = x.reshape((x.shape[0], -1))
        for index in range(1, len(self.hidden) + 1):
            dense = nn.Dense(widths[f"fc{index}"], kernel_init=_relu_init, name=f"fc{index}")
            x = nn.relu(dense(x))
            if self.dropout_rate > 0.0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(widths["head"], name="head")(x)


def vgg_small(
    num_classes: int, widths: Mapping[str, int] | None = None, *, conv_impl: str = "auto"
) -> VGG:
    """VGG-small: 32-32-M-64-64-M-128-128-M, each conv + BN + ReLU, dense 512, dropout 0.5.

    About 29.7 M multiply-accumulates per 28x28x1 image (the 7x7 maps are pooled to 3x3).

    Args:
      num_classes: outputs of the logits layer.
      widths: optional (partial) width spec.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`).

    Returns:
      The unbound module.
    """
    return VGG(
        num_classes=num_classes,
        stages=VGG_SMALL_STAGES,
        hidden=(512,),
        batch_norm=True,
        dropout_rate=0.5,
        pool_padding="VALID",
        widths=widths,
        conv_impl=conv_impl,
    )


def vgg_small_plain(
    num_classes: int, widths: Mapping[str, int] | None = None, *, conv_impl: str = "auto"
) -> VGG:
    """`vgg_small` without BatchNorm: each conv has a bias and is followed by ReLU only.

    For methods whose paper network has no BatchNorm (Osaku et al.'s progressive retraining):
    there, retraining can recover accuracy only through the weights. Arguments and return as
    `vgg_small`.
    """
    return vgg_small(num_classes, widths, conv_impl=conv_impl).clone(batch_norm=False)


def vgg16_bn(
    num_classes: int, widths: Mapping[str, int] | None = None, *, conv_impl: str = "auto"
) -> VGG:
    """CIFAR VGG-16 with BatchNorm: 13 conv + BN + ReLU layers, dense 512 + ReLU, logits.

    Pooling rounds odd sizes up (see `VGG.pool_padding`), so 28x28 inputs work too.

    Args:
      num_classes: outputs of the logits layer.
      widths: optional (partial) width spec.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`).

    Returns:
      The unbound module.
    """
    return VGG(
        num_classes=num_classes,
        stages=VGG16_STAGES,
        hidden=(512,),
        batch_norm=True,
        dropout_rate=0.0,
        pool_padding="SAME",
        widths=widths,
        conv_impl=conv_impl,
    )


def vgg16(
    num_classes: int, widths: Mapping[str, int] | None = None, *, conv_impl: str = "auto"
) -> VGG:
    """The original VGG-16 (configuration D): 13 convs with bias and no BatchNorm, then
    dense 4096 + ReLU + dropout 0.5, dense 4096 + ReLU + dropout 0.5, logits.

    With 1000 classes on 224x224x3 it has 138,357,544 parameters and 15.47 G MACs.
    Pooling rounds odd sizes up (see `VGG.pool_padding`), so 28x28 inputs work too.

    Args:
      num_classes: outputs of the logits layer.
      widths: optional (partial) width spec.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`).

    Returns:
      The unbound module.
    """
    return VGG(
        num_classes=num_classes,
        stages=VGG16_STAGES,
        hidden=(4096, 4096),
        batch_norm=False,
        dropout_rate=0.5,
        pool_padding="SAME",
        widths=widths,
        conv_impl=conv_impl,
    )
