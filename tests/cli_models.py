"""Model factories as a user writes them for ``--model tests/cli_models.py:NAME``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not training)(nn.Conv(12, (3, 3))(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.Dropout(0.2, deterministic=not training)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(x)


def make_linen(input_shape):
    module = Net()
    variables = module.init(jax.random.key(0), jnp.zeros((1, *input_shape)))
    return module, variables


def bare_module():
    return Net()


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 12, (3, 3), rngs=rngs)
        self.head = nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(x.mean(axis=(1, 2)))


def make_nnx():
    return NnxNet(nnx.Rngs(0))


def not_a_model():
    return 42
