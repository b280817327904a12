"""Runs jaxprune's data passes over a mesh of every local device; used by
tests/test_sharding.py.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/sharded_passes.py OUT.npz

Several processes: set JAX_COORDINATOR_ADDRESS, JAXPRUNE_NUM_PROCESSES and JAXPRUNE_PROCESS_ID
in each (`jaxprune.runtime.initialize_distributed`); every process writes OUT.npz.<index>.

On a small CNN (conv-BN-ReLU, dropout, dense) and fixed synthetic batches of 8, 8 and 6 images
(6 does not split over 4 devices: that batch runs whole on every device), saves every data
criterion's scores and the oracle's, and the variables after a short fine-tuning (`fit`) with
dropout and BatchNorm in training mode, with the devices used.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.criteria import CRITERIA, ScoringContext, score
from jaxprune.criteria.functionality import VisualizationConfig, maximization_images
from jaxprune.criteria.report import ORACLES
from jaxprune.fit import FitConfig, fit
from jaxprune.graph import channel_graph
from jaxprune.methods.blending import BlendingConfig
from jaxprune.methods.evolution import EvolutionConfig
from jaxprune.methods.oneshot import OneShotConfig
from jaxprune.methods.registry import METHODS
from jaxprune.model import Model
from jaxprune.runtime import enable_compilation_cache, initialize_distributed
from jaxprune.sharding import default_mesh, place_batch, to_host

SIZES = (8, 8, 6)


class SmallNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in (6, 8):
            x = nn.Conv(width, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = nn.Dropout(0.25, deterministic=not train)(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


class Batches:
    """`PruneData` over fixed batches: the same ones every epoch."""

    def __init__(self, batches):
        self.batches = batches

    def train(self, epoch):
        return iter(self.batches)

    def validation(self):
        return iter(self.batches)


def main(out_path: str) -> None:
    if "JAXPRUNE_NUM_PROCESSES" in os.environ:
        index, _ = initialize_distributed()
        out_path = f"{out_path}.{index}.npz"
    enable_compilation_cache()
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 4, n).astype(np.int32),
        }
        for n in SIZES
    ]
    net = SmallNet()
    x = jnp.zeros((1, 8, 8, 3))
    variables = net.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    model = Model.linen(net, x, variables=variables)
    graph = channel_graph(model.apply_fn, variables, x, **model.eval_kwargs)
    context = ScoringContext(model.apply_fn, graph, apply_kwargs=model.eval_kwargs)
    saved = {}
    for name in CRITERIA:
        scores = score(name, context, variables, batches)
        for group, values in scores.items():
            saved[f"score/{name}/{group}"] = np.asarray(values)
    # Activation-maximisation images: the filters split over the devices (8 over 4, and 6
    # filters of one group padded to 8).
    visual = VisualizationConfig(steps=3)
    for group in graph.names[:2]:
        images = maximization_images(
            model.apply_fn, graph, variables, group, (8, 8, 3), visual,
            apply_kwargs=model.eval_kwargs,
        )  # fmt: skip
        saved[f"images/{group}"] = np.asarray(images)
    tuned, history = fit(model, variables, Batches(batches), FitConfig(epochs=2), progress=False)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tuned):
        saved["fit/" + jax.tree_util.keystr(path)] = to_host(leaf)
    # Rows each device holds of each batch: split (8 over 4 devices: 2 each) or whole.
    mesh = default_mesh()
    rows = [
        sorted(
            {s.data.shape[0] for s in jnp.asarray(place_batch(b, mesh)["image"]).addressable_shards}
        )
        for b in batches
    ]
    # Two methods end to end (no workdir): the kept channels and the final variables.
    methods = {
        "oneshot": OneShotConfig(criterion="taylor", ratio=0.5, finetune=FitConfig(epochs=1)),
        "blending": BlendingConfig(
            criterion="l1,fpgm,apoz,activation_mean",
            ratio=0.25,
            score_examples=16,
            fitness_examples=16,
            batch_size=8,
            evolution=EvolutionConfig(population=4, generations=2),
            finetune=FitConfig(epochs=1),
        ),
    }
    for name, config in methods.items():
        result = METHODS[name].prune(model, variables, Batches(batches), config, progress=False)
        for group, kept in result.keep.items():
            saved[f"{name}/keep/{group}"] = np.asarray(kept)
        for path, leaf in jax.tree_util.tree_leaves_with_path(result.variables):
            saved[f"{name}/variables/" + jax.tree_util.keystr(path)] = to_host(leaf)
    summary = {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "rows_per_device": rows,
        "criteria": [n for n in CRITERIA if n not in ORACLES] + list(ORACLES),
        "losses": [record["loss"] for record in history],
    }
    np.savez(out_path, summary=json.dumps(summary), **saved)


if __name__ == "__main__":
    main(sys.argv[1])
