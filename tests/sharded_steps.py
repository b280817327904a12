"""Runs a few data-parallel train steps and an evaluation; used by tests/test_train.py.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/sharded_steps.py OUT.npz

Trains a tiny CNN (Conv, BatchNorm, dropout, Dense) on fixed synthetic data over a mesh of
every local device, and saves the final params, the per-step losses, an evaluation over 21
examples (not a multiple of the device count) and the error raised for a batch size that the
devices do not divide.
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import sharding, train
from jaxprune.runtime import enable_compilation_cache

STEPS = 4
BATCH = 16


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Dropout(0.25, deterministic=not train)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def main(out_path: str) -> None:
    enable_compilation_cache()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(STEPS * BATCH, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 3, size=STEPS * BATCH).astype(np.int32)
    mesh = sharding.make_mesh()
    config = train.OptimizerConfig(learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
    tx = train.make_optimizer(config, steps_per_epoch=STEPS, epochs=1)
    state = train.create_train_state(TinyNet(), tx, jax.random.key(1), jnp.zeros((1, 6, 6, 2)))
    state = sharding.replicate(state, mesh)
    losses = []
    for step in range(STEPS):
        part = slice(step * BATCH, (step + 1) * BATCH)
        batch = sharding.shard_batch({"image": images[part], "label": labels[part]}, mesh)
        assert len(batch["image"].sharding.device_set) == mesh.size
        state, metrics = train.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    batches = [{"image": images[i : i + 8], "label": labels[i : i + 8]} for i in (0, 8, 16)]
    batches[-1] = {key: value[:5] for key, value in batches[-1].items()}
    evaluation = train.evaluate(state.model, state.variables(), batches, mesh=mesh)
    try:
        sharding.shard_batch({"image": images[:6], "label": labels[:6]}, mesh)
        error = ""
    except ValueError as caught:
        error = str(caught)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
    summary = {"devices": mesh.size, "losses": losses, "evaluation": evaluation, "error": error}
    np.savez(out_path, summary=json.dumps(summary), **flat)


if __name__ == "__main__":
    main(sys.argv[1])
