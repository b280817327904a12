"""Small models written here, not in the zoo, to show the core works on any flax module.

Each takes a width spec (`widths`: sorted (layer path, features) pairs) so a pruned copy can be
rebuilt; defaults are used for layers the spec leaves out.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class _Widths(nn.Module):
    widths: tuple = ()

    def w(self, name: str, default: int) -> int:
        return dict(self.widths).get(name, default)


class ConvBNDense(_Widths):
    """conv-BN-relu x2, max pool, flatten, dense-relu, dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, f in enumerate((6, 8)):
            x = nn.Conv(self.w(f"conv{i}", f), (3, 3), use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.w("fc", 12), name="fc")(x))
        return nn.Dense(self.w("head", 5), name="head")(x)


class DepthwiseSeparable(_Widths):
    """conv, depthwise 3x3 (groups == channels), pointwise 1x1, global average pool, dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.w("stem", 8), (3, 3), name="stem")(x))
        c = x.shape[-1]
        x = nn.Conv(c, (3, 3), feature_group_count=c, name="depthwise")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_dw")(x)
        x = nn.relu(x)
        x = nn.relu(nn.Conv(self.w("pointwise", 10), (1, 1), name="pointwise")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.w("head", 4), name="head")(x)


class TwoBranchConcat(_Widths):
    """Two conv branches concatenated on channels, a conv over both, flatten, dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.relu(nn.Conv(self.w("branch_a", 5), (3, 3), name="branch_a")(x))
        b = nn.relu(nn.Conv(self.w("branch_b", 3), (1, 1), name="branch_b")(x))
        x = jnp.concatenate([a, b], axis=-1)
        y = nn.relu(nn.Conv(self.w("mix", 6), (3, 3), strides=2, name="mix")(x))
        # A dense after a flatten of a concatenation: rows interleave (h, w, [a, b, y]).
        z = jnp.concatenate([nn.max_pool(x, (2, 2), (2, 2)), y], axis=-1)
        z = z.reshape(z.shape[0], -1)
        return nn.Dense(self.w("head", 3), name="head")(z)


class ResidualProjection(_Widths):
    """Stem, a residual block with a 1x1 projection shortcut, an identity block, GAP, dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(name):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)

        x = nn.relu(
            bn("stem_bn")(nn.Conv(self.w("stem", 6), (3, 3), use_bias=False, name="stem")(x))
        )
        # Block 1: width change, so a projection shortcut.
        h = nn.relu(
            bn("b1_bn1")(nn.Conv(self.w("b1_conv1", 7), (3, 3), use_bias=False, name="b1_conv1")(x))
        )
        h = bn("b1_bn2")(
            nn.Conv(self.w("b1_conv2", 8), (3, 3), strides=2, use_bias=False, name="b1_conv2")(h)
        )
        s = bn("b1_bn_sc")(
            nn.Conv(
                self.w("b1_shortcut", 8), (1, 1), strides=2, use_bias=False, name="b1_shortcut"
            )(x)
        )
        x = nn.relu(h + s)
        # Block 2: identity shortcut, so its conv2 joins the same group.
        h = nn.relu(
            bn("b2_bn1")(nn.Conv(self.w("b2_conv1", 5), (3, 3), use_bias=False, name="b2_conv1")(x))
        )
        h = bn("b2_bn2")(nn.Conv(self.w("b2_conv2", 8), (3, 3), use_bias=False, name="b2_conv2")(h))
        x = nn.relu(h + x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.w("head", 3), name="head")(x)


TOY_MODELS = {
    "conv_bn_dense": ConvBNDense,
    "depthwise_separable": DepthwiseSeparable,
    "two_branch_concat": TwoBranchConcat,
    "residual_projection": ResidualProjection,
}
