"""CIFAR ResNets (He et al. 2016): a 3x3 stem, three stages of basic blocks, global pooling.

Shortcuts use option B: identity where the shape is kept, a 1x1 conv (stride 2) + BN projection
where it changes. Every conv whose output enters a stage's residual sum (the stem or the
projection, and each block's ``conv2``) is coupled: they must keep one common width, which
`ResNet.coupled_widths` lists and the width checks enforce.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune import ops
from jaxprune.models.widths import (
    FrozenWidths,
    check_num_classes,
    freeze_widths,
    resolve_widths,
)

# He-normal initialisation, as in the reference CIFAR ResNets; BatchNorm follows every conv.
_conv_init = nn.initializers.he_normal()
_PAD_1 = ((1, 1), (1, 1))  # Symmetric padding 1, so stride-2 convs sample at even positions.


class BlockLayout(NamedTuple):
    """Static layout of one basic block.

    Attributes:
      conv1: output features of the first 3x3 conv.
      conv2: output features of the second 3x3 conv (= of the block).
      strides: stride of the first conv and of the projection.
      shortcut: output features of the 1x1 conv + BN projection, or None for the identity.
    """

    conv1: int
    conv2: int
    strides: int
    shortcut: int | None


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    Attributes:
      layout: widths, stride and shortcut kind of this block.
    """

    layout: BlockLayout
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block to NHWC features."""
        strides = (self.layout.strides, self.layout.strides)
        conv = functools.partial(nn.Conv, conv_general_dilated=ops.conv_impl(self.conv_impl))
        y = conv(
            self.layout.conv1,
            (3, 3),
            strides=strides,
            padding=_PAD_1,
            use_bias=False,
            kernel_init=_conv_init,
            name="conv1",
        )(x)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = conv(
            self.layout.conv2,
            (3, 3),
            padding=_PAD_1,
            use_bias=False,
            kernel_init=_conv_init,
            name="conv2",
        )(y)
        y = _batch_norm(train, "bn2")(y)
        if self.layout.shortcut is not None:
            x = conv(
                self.layout.shortcut,
                (1, 1),
                strides=strides,
                padding="VALID",
                use_bias=False,
                kernel_init=_conv_init,
                name="shortcut",
            )(x)
            x = _batch_norm(train, "shortcut_bn")(x)
        return nn.relu(x + y)


class ResNetStage(nn.Module):
    """A sequence of basic blocks named ``block0``, ``block1``, ...

    Attributes:
      blocks: the layout of each block, in order.
    """

    blocks: tuple[BlockLayout, ...]
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the blocks in order."""
        for index, layout in enumerate(self.blocks):
            x = BasicBlock(layout, self.conv_impl, name=f"block{index}")(x, train)
        return x


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) built from a width spec.

    ``stem`` (conv3x3 + ``stem_bn`` + ReLU), stages ``stage1``..``stageS`` of `blocks_per_stage`
    basic blocks (``stageS/blockB/conv1``, ``bn1``, ``conv2``, ``bn2``, and ``shortcut``,
    ``shortcut_bn`` where a projection is used), global average pooling, ``head``. Stages after
    the first start with stride 2. A block gets a projection shortcut (option B: 1x1 conv +
    BN) when its stride or its default input and output widths differ; otherwise the identity.

    Attributes:
      num_classes: outputs of the logits layer ``head``.
      blocks_per_stage: n; the depth is 6n + 2 (3 for ResNet-20, 9 for ResNet-56).
      stage_widths: default widths of the stages; the stem takes the first.
      widths: width spec (layer path -> output features); missing layers take the defaults.
        Stored as sorted pairs.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`): "auto", "xla" or
        "gemm"; it changes the speed of training, not the results.
    """

    num_classes: int
    blocks_per_stage: int = 3
    stage_widths: tuple[int, ...] = (16, 32, 64)
    widths: Mapping[str, int] | FrozenWidths | None = None
    conv_impl: str = "auto"

    def __post_init__(self) -> None:
        # Linen fields must be hashable, so keep the spec as sorted pairs; validate it now so a
        # typo or a broken residual coupling fails at construction rather than at init.
        object.__setattr__(self, "widths", freeze_widths(self.widths))
        check_num_classes(self.num_classes, "ResNet")
        if self.blocks_per_stage < 1 or not self.stage_widths:
            raise ValueError(
                "ResNet needs blocks_per_stage >= 1 and at least one stage width, got "
                f"{self.blocks_per_stage} and {self.stage_widths}."
            )
        self.full_widths()
        super().__post_init__()

    def _default_layouts(self) -> list[list[BlockLayout]]:
        """Returns the unpruned layout of every block; shortcut kinds come from these."""
        stages = []
        in_width = self.stage_widths[0]
        for stage, width in enumerate(self.stage_widths):
            blocks = []
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                shortcut = width if strides != 1 or in_width != width else None
                blocks.append(BlockLayout(width, width, strides, shortcut))
                in_width = width
            stages.append(blocks)
        return stages

    def default_widths(self) -> dict[str, int]:
        """Returns the full width spec of the unpruned network."""
        widths = {"stem": self.stage_widths[0]}
        for stage, blocks in enumerate(self._default_layouts(), start=1):
            for block, layout in enumerate(blocks):
                prefix = f"stage{stage}/block{block}"
                widths[f"{prefix}/conv1"] = layout.conv1
                widths[f"{prefix}/conv2"] = layout.conv2
                if layout.shortcut is not None:
                    widths[f"{prefix}/shortcut"] = layout.shortcut
        widths["head"] = self.num_classes
        return widths

    def coupled_widths(self) -> tuple[tuple[str, ...], ...]:
        """Returns the groups of layers whose outputs are added, so must share a width.

        A group is a stage's residual stream: whatever enters it (the stem, or the stage's
        projection) and every block's ``conv2``. A stage whose first block has an identity
        shortcut continues the previous group.
        """
        groups: list[list[str]] = []
        current = ["stem"]
        for stage, blocks in enumerate(self._default_layouts(), start=1):
            for block, layout in enumerate(blocks):
                prefix = f"stage{stage}/block{block}"
                if layout.shortcut is not None:
                    groups.append(current)
                    current = [f"{prefix}/shortcut"]
                current.append(f"{prefix}/conv2")
        groups.append(current)
        return tuple(tuple(group) for group in groups)

    def full_widths(self) -> dict[str, int]:
        """Returns the complete spec this module builds: defaults overridden by `widths`."""
        return resolve_widths(
            self.widths,
            self.default_widths(),
            model=f"resnet{6 * self.blocks_per_stage + 2}",
            fixed=["head"],
            coupled=self.coupled_widths(),
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps NHWC images to logits.

        Args:
          x: images, shape (batch, height, width, channels), float32.
          train: BatchNorm uses batch statistics (and updates ``batch_stats``) when True, and
            running averages when False.

        Returns:
          Logits of shape (batch, num_classes).
        """
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images of rank 4, got shape {x.shape}.")
        widths = self.full_widths()
        conv = functools.partial(nn.Conv, conv_general_dilated=ops.conv_impl(self.conv_impl))
        x = conv(
            widths["stem"],
            (3, 3),
            padding=_PAD_1,
            use_bias=False,
            kernel_init=_conv_init,
            name="stem",
        )(x)
        x = nn.relu(_batch_norm(train, "stem_bn")(x))
        for stage, blocks in enumerate(self._default_layouts(), start=1):
            layouts = tuple(
                BlockLayout(
                    widths[f"stage{stage}/block{block}/conv1"],
                    widths[f"stage{stage}/block{block}/conv2"],
                    layout.strides,
                    None
                    if layout.shortcut is None
                    else widths[f"stage{stage}/block{block}/shortcut"],
                )
                for block, layout in enumerate(blocks)
            )
            x = ResNetStage(layouts, self.conv_impl, name=f"stage{stage}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(widths["head"], name="head")(x)


def resnet20(
    num_classes: int, widths: Mapping[str, int] | None = None, *, conv_impl: str = "auto"
) -> ResNet:
    """ResNet-20 for CIFAR: 3 blocks per stage, 16-32-64 channels, option-B projections.

    Args:
      num_classes: outputs of the logits layer.
      widths: optional (partial) width spec.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`).

    Returns:
      The unbound module.
    """
    return ResNet(num_classes=num_classes, blocks_per_stage=3, widths=widths, conv_impl=conv_impl)


def resnet56(
    num_classes: int, widths: Mapping[str, int] | None = None, *, conv_impl: str = "auto"
) -> ResNet:
    """ResNet-56 for CIFAR: 9 blocks per stage, 16-32-64 channels, option-B projections.

    With 10 classes it has 855,770 parameters and about 125.7 M MACs per 32x32 image.

    Args:
      num_classes: outputs of the logits layer.
      widths: optional (partial) width spec.
      conv_impl: the convolution implementation (`jaxprune.ops.conv_impl`).

    Returns:
      The unbound module.
    """
    return ResNet(num_classes=num_classes, blocks_per_stage=9, widths=widths, conv_impl=conv_impl)
