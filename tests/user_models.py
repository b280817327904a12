"""CNNs written the way people write them, not for jaxprune: hard-coded widths, `setup` and
`nn.compact`, partials, shape-dependent branches, constants, other normalisations, extra
outputs. None takes a width spec; each must still be graphed, pruned, run and exported.

Each model class has a `SHAPE` (an example input shape, batch first) and, where it needs one,
`KWARGS` for its apply call.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class CompactHardCoded(nn.Module):
    """The Flax tutorial style: widths typed into `nn.compact`, BatchNorm, dropout."""

    SHAPE = (2, 16, 16, 3)
    KWARGS = {"train": False}

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(32, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(64, (3, 3))(x)
        x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(128)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x)


class SetupHardCoded(nn.Module):
    """Layers declared in `setup`, built with `functools.partial`, called in `__call__`."""

    SHAPE = (2, 12, 12, 1)
    KWARGS = {}

    def setup(self):
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME", use_bias=False)
        self.c1 = conv(24)
        self.n1 = nn.BatchNorm(use_running_average=True)
        self.c2 = conv(48, strides=(2, 2))
        self.n2 = nn.BatchNorm(use_running_average=True)
        self.head = nn.Dense(7)

    def __call__(self, x):
        x = nn.relu(self.n1(self.c1(x)))
        x = nn.swish(self.n2(self.c2(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


class BottleneckBlock(nn.Module):
    """A ResNet bottleneck whose projection depends on the shapes, as in Flax's example."""

    filters: int
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.Conv(self.filters, (1, 1), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=True)(y))
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(y)
        y = nn.relu(nn.BatchNorm(use_running_average=True)(y))
        y = nn.Conv(self.filters * 4, (1, 1), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=True, scale_init=nn.initializers.ones)(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.filters * 4, (1, 1), self.strides, use_bias=False)(residual)
            residual = nn.BatchNorm(use_running_average=True)(residual)
        return nn.relu(residual + y)


class ShapeBranchResNet(nn.Module):
    """Stem, then bottlenecks with and without projections (the branch is taken by shape)."""

    SHAPE = (2, 16, 16, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(16, (3, 3))(x)))
        x = BottleneckBlock(4)(x)  # 16 -> 16 channels: identity shortcut
        x = BottleneckBlock(8)(x)  # 16 -> 32: a projection, because the widths differ
        x = BottleneckBlock(8, (2, 2))(x)  # a projection, because of the stride
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


# ImageNet statistics closed over as arrays, as some model zoos do inside the model.
_MEAN = jnp.array([0.485, 0.456, 0.406], dtype=jnp.float32)
_STD = jnp.array([0.229, 0.224, 0.225], dtype=jnp.float32)


class NormalisedInputVGG(nn.Module):
    """Normalises its input with closed-over constants, then a small VGG with a flatten."""

    SHAPE = (2, 8, 8, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = (x - _MEAN) / _STD
        for width in (8, 8, "M", 16):
            if width == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.relu(nn.Conv(width, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(4)(nn.relu(nn.Dense(12)(x)))


class SqueezeExcite(nn.Module):
    reduction: int = 4

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(nn.Conv(max(1, c // self.reduction), (1, 1))(s))
        s = nn.sigmoid(nn.Conv(c, (1, 1))(s))
        return x * s


class MobileBlocks(nn.Module):
    """Inverted residuals: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1."""

    SHAPE = (2, 12, 12, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = nn.relu6(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        for expand, out in ((4, 16), (4, 24)):
            inp = x
            c = x.shape[-1] * expand
            h = nn.relu6(nn.BatchNorm(use_running_average=True)(nn.Conv(c, (1, 1))(x)))
            h = nn.Conv(c, (3, 3), feature_group_count=c, use_bias=False)(h)
            h = nn.relu6(nn.BatchNorm(use_running_average=True)(h))
            h = SqueezeExcite()(h)
            h = nn.BatchNorm(use_running_average=True)(nn.Conv(out, (1, 1))(h))
            x = inp + h if inp.shape == h.shape else h
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class DenseLayer(nn.Module):
    growth: int

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        y = nn.Conv(self.growth, (3, 3), use_bias=False)(y)
        return jnp.concatenate([x, y], axis=-1)


class TinyDenseNet(nn.Module):
    """DenseNet-style: every layer's input is the concatenation of all earlier outputs, with
    a BatchNorm over the concatenation."""

    SHAPE = (2, 10, 10, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        for _ in range(3):
            x = DenseLayer(6)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class GroupNormNet(nn.Module):
    """Convolutions normalised with GroupNorm (channels in groups of 4)."""

    SHAPE = (2, 8, 8, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(16, (3, 3))(x)))
        x = nn.relu(nn.GroupNorm(num_groups=None, group_size=4)(nn.Conv(24, (3, 3))(x)))
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


class ConvNeXtBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        inp = x
        x = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim)(x)
        x = nn.LayerNorm(epsilon=1e-6)(x)
        x = nn.Dense(4 * self.dim)(x)
        x = nn.gelu(x)
        x = nn.Dense(self.dim)(x)
        gamma = self.param("gamma", nn.initializers.constant(0.5), (self.dim,))
        return inp + gamma * x


class TinyConvNeXt(nn.Module):
    """Patchify stem with LayerNorm over channels, two ConvNeXt blocks, an RMSNorm head."""

    SHAPE = (2, 16, 16, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(epsilon=1e-6)(nn.Conv(16, (4, 4), strides=(4, 4))(x))
        x = ConvNeXtBlock(16)(x)
        x = ConvNeXtBlock(16)(x)
        x = nn.RMSNorm()(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(6)(x)


class StdConv(nn.Conv):
    """A weight-standardised convolution (the kernel is standardised over its receptive field
    and input channels before use), as in BiT."""

    def param(self, name, init_fn, *init_args, **init_kwargs):
        param = super().param(name, init_fn, *init_args, **init_kwargs)
        if name == "kernel":
            param = param - jnp.mean(param, axis=(0, 1, 2), keepdims=True)
            param = param / jnp.sqrt(jnp.var(param, axis=(0, 1, 2), keepdims=True) + 1e-5)
        return param


class WeightStandardised(nn.Module):
    """BiT-style: StdConv + GroupNorm."""

    SHAPE = (2, 8, 8, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = StdConv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(num_groups=4)(x))
        x = StdConv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(num_groups=4)(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class FeaturesOut(nn.Module):
    """Returns its logits and a dict of feature maps (the features' channels stay)."""

    SHAPE = (2, 8, 8, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(8, (3, 3))(x))
        b = nn.relu(nn.Conv(12, (3, 3))(a))
        c = nn.relu(nn.Conv(10, (3, 3))(b))
        logits = nn.Dense(4)(jnp.mean(c, axis=(1, 2)))
        return logits, {"stage2": b}


class ChannelConstants(nn.Module):
    """Arrays sized by the channel count: a ramp and a division by the width."""

    SHAPE = (2, 8, 8, 3)
    KWARGS = {}

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(12, (3, 3))(x))
        c = x.shape[-1]
        x = x * (1.0 + jnp.arange(c) / c)
        x = x + jnp.asarray(np.linspace(-1.0, 1.0, c), jnp.float32)
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(3)(jnp.sum(x, axis=(1, 2)) / x.shape[-1])


class NnxCNN(nnx.Module):
    """The CNN of Flax's NNX tutorial style: `nnx.Conv`, `nnx.BatchNorm`, `nnx.Linear`."""

    SHAPE = (2, 12, 12, 1)

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.dw = nnx.Conv(32, 32, kernel_size=(3, 3), feature_group_count=32, rngs=rngs)
        self.linear1 = nnx.Linear(6 * 6 * 32, 64, rngs=rngs)
        self.linear2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.dw(x))
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


LINEN_MODELS = (
    CompactHardCoded,
    SetupHardCoded,
    ShapeBranchResNet,
    NormalisedInputVGG,
    MobileBlocks,
    TinyDenseNet,
    GroupNormNet,
    TinyConvNeXt,
    WeightStandardised,
    FeaturesOut,
    ChannelConstants,
)


def init_linen(model_cls, seed: int = 0):
    """(model, variables, x, kwargs) with a random input of the model's example shape."""
    model = model_cls()
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(model_cls.SHAPE), jnp.float32)
    kwargs = dict(model_cls.KWARGS)
    variables = model.init(jax.random.key(seed), x, **kwargs)
    # Non-trivial statistics, so BatchNorm is not the identity.
    if "batch_stats" in variables:
        variables = dict(variables)
        variables["batch_stats"] = random_statistics(variables["batch_stats"], seed + 1)
    return model, variables, x, kwargs


def random_statistics(stats, seed: int):
    """BatchNorm running means near 0 and variances near 1, different per channel."""
    rng = np.random.default_rng(seed)

    def draw(path, v):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, v.shape), v.dtype)

    return jax.tree_util.tree_map_with_path(draw, stats)


def half_keep(graph, seed=1):
    """Half of every group's channels (whole blocks), chosen at random."""
    rng = np.random.default_rng(seed)
    keep = {}
    for group in graph.groups:
        blocks = group.size // group.block
        chosen = np.sort(rng.choice(blocks, max(1, blocks // 2), replace=False))
        keep[group.name] = (chosen[:, None] * group.block + np.arange(group.block)).reshape(-1)
    return keep


def close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(x))))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=rtol * scale, rtol=0)
