"""How much of the VGG-small train step's gap to PyTorch is BatchNorm: the step with and
without it, in jaxprune and PyTorch.

Command (from the repository root):

    python -m experiments.bench.batchnorm_share      # prints the table; nothing written

The train step (forward, cross-entropy, backward, SGD with momentum; batch 128) of VGG-small
and of the same network without BatchNorm: jaxprune's ``vgg_small`` and ``vgg_small_plain``
(convs with biases instead), PyTorch's twin and the twin with every ``BatchNorm2d`` replaced
by an identity. All four take turns in one process (`experiments.bench.timing.take_turns`),
with the process's default malloc.

Result (2-core Intel Xeon with AVX-512, jax 0.10.2 with oneDNN convolutions, torch 2.13.0,
idle; a first run gave 217.7 / 140.6 and 126.0 / 95.6 ms, the same picture):

    train step ms, batch 128   with BatchNorm   without   BatchNorm's share
    jaxprune                        205.0         116.2        88.7
    PyTorch                         114.3          93.6        20.6

BatchNorm in training mode (batch statistics, normalisation and their gradients) costs XLA:CPU
89 ms of the step against PyTorch's 21: 68 of the 91 ms between the two steps. Without it the
step is 1.24x PyTorch's (1.47x in the first run). A fused BatchNorm kernel is where the next
gain is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench import torch_zoo
from experiments.bench.timing import take_turns
from jaxprune import train
from jaxprune.models import build_model

BATCH = 128


def jax_runner(name: str, rng: np.random.Generator):
    """A warmed-up, blocking jaxprune train step of a zoo model."""
    model = build_model(name, torch_zoo.NUM_CLASSES)
    images = jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, torch_zoo.NUM_CLASSES, BATCH), jnp.int32)
    state = train.create_train_state(
        model, optax.sgd(0.01, momentum=0.9), jax.random.key(0), images[:1]
    )
    box = {"state": state, "batch": {"image": images, "label": labels}}

    def step():
        box["state"], metrics = train.train_step(box["state"], box["batch"])
        jax.block_until_ready(metrics)

    for _ in range(3):
        step()
    return step


def torch_runner_without_batchnorm(rng: np.random.Generator):
    """PyTorch's VGG-small step with every BatchNorm2d replaced by an identity."""
    import torch

    def strip(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.Identity())
            else:
                strip(child)

    build = torch_zoo.torch_model

    def without(name):
        model = build(name)
        strip(model)
        return model

    torch_zoo.torch_model = without
    try:
        return torch_zoo.train_step_runner("vgg_small", BATCH, rng)
    finally:
        torch_zoo.torch_model = build


def main() -> None:
    rng = np.random.default_rng(0)
    runners = {
        "jaxprune, with BatchNorm": jax_runner("vgg_small", rng),
        "jaxprune, without": jax_runner("vgg_small_plain", rng),
        "PyTorch, with BatchNorm": torch_zoo.train_step_runner("vgg_small", BATCH, rng),
        "PyTorch, without": torch_runner_without_batchnorm(rng),
    }
    timing = take_turns(runners, rounds=3, per_round=3)
    ms = {name: row["median_ms"] for name, row in timing.items()}
    print(f"train step ms, batch {BATCH}   with BatchNorm   without   BatchNorm's share")
    for side in ("jaxprune", "PyTorch"):
        with_bn, without = ms[f"{side}, with BatchNorm"], ms[f"{side}, without"]
        print(f"{side:<26} {with_bn:10.1f} {without:12.1f} {with_bn - without:12.1f}")


if __name__ == "__main__":
    main()
