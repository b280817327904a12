"""The pruning core's costs: graph and surgery time, and the realised speed-up of pruned models.

jaxprune: `channel_graph` (trace + analysis), then `prune` keeping the half of every group with
the largest L1 norm. Torch-Pruning (when installed): its dependency graph and one L1 pruning
step of 50% of every group on the PyTorch twin. For both, the pruned model's inference speed-up
at batch 1 and 128 against its MACs ratio.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import torch_zoo
from experiments.bench.timing import median_seconds
from jaxprune import cost, criteria
from jaxprune.graph import channel_graph
from jaxprune.methods.oneshot import OneShotConfig, keep_from_scores
from jaxprune.models import build_model
from jaxprune.models.random_init import random_variables
from jaxprune.surgery import prune

NUM_CLASSES = torch_zoo.NUM_CLASSES


def half_by_l1(graph: Any, variables: Any) -> dict[str, np.ndarray]:
    """Keep indices of the half of each group's channels with the largest L1 norm (Li et al.)."""
    context = criteria.ScoringContext(apply_fn=None, graph=graph)
    scores = criteria.score("l1", context, variables)
    return keep_from_scores(graph, scores, OneShotConfig(ratio=0.5, scope="all"))


def graph_and_surgery(name: str, shape: tuple[int, ...], num_classes: int, repeats: int) -> dict:
    """jaxprune's channel graph and 50% L1 surgery times for one zoo model (random weights)."""
    model = build_model(name, num_classes)
    x = jnp.zeros(shape)
    variables = random_variables(model, x)
    # The first graph and prune of a process also pay for compiling JAX's eager operations at
    # these shapes (one gather per leaf shape before host slicing, the self-check's ops).
    start = time.perf_counter()
    graph = channel_graph(model.apply, variables, x)
    first_graph_s = time.perf_counter() - start
    keep = half_by_l1(graph, variables)  # the scores are timed in neither
    start = time.perf_counter()
    jax.block_until_ready(jax.tree_util.tree_leaves(prune(variables, graph, keep).variables))
    first = {"first_graph_s": first_graph_s, "first_surgery_s": time.perf_counter() - start}
    graph_s, graph = median_seconds(lambda: channel_graph(model.apply, variables, x), repeats)
    surgery_s, _ = median_seconds(lambda: prune(variables, graph, keep).variables, repeats)
    bare_s, _ = median_seconds(
        lambda: prune(variables, graph, keep, verify=False).variables, repeats
    )
    return {
        "model": name,
        "input": list(shape),
        "groups": len(graph),
        "graph_s": graph_s,
        "surgery_s": surgery_s,
        "surgery_no_verify_s": bare_s,
        "total_s": graph_s + surgery_s,
        "total_no_verify_s": graph_s + bare_s,
        **first,
        "first_total_s": first["first_graph_s"] + first["first_surgery_s"],
    }


def torch_pruning_step(name: str, repeats: int) -> dict:
    """Torch-Pruning's dependency graph + one 50% L1 step on a fresh twin, median of `repeats`."""
    times = []
    for _ in range(repeats):
        model = torch_zoo.torch_model(name)
        seconds, _ = median_seconds(lambda model=model: torch_zoo.prune_half_l1(model, name), 1)
        times.append(seconds)
    return {"model": name, "total_s": float(np.median(times))}


def jax_speedup(name: str, repeats: int, batches: tuple[int, ...]) -> dict:
    """MACs ratio and measured inference speed-up of a zoo model with 50% of every group cut."""
    image_shape = torch_zoo.IMAGE_SHAPES[name]
    model = build_model(name, NUM_CLASSES)
    x1 = jnp.zeros((1, *image_shape))
    variables = random_variables(model, x1)
    graph = channel_graph(model.apply, variables, x1)
    pruned = prune(variables, graph, half_by_l1(graph, variables))
    small = build_model(name, NUM_CLASSES, pruned.widths)
    before = cost.count(model.apply, variables, x1)
    after = cost.count(small.apply, pruned.variables, x1)
    row: dict[str, Any] = {
        "model": name,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "macs_ratio": before.macs / after.macs,
        "params_before": before.params,
        "params_after": after.params,
    }
    for batch in batches:
        x = jax.random.normal(jax.random.key(0), (batch, *image_shape))
        t_full = cost.latency(model.apply, variables, x, repeats=repeats).median
        t_small = cost.latency(small.apply, pruned.variables, x, repeats=repeats).median
        row[f"latency_b{batch}_before_ms"] = 1e3 * t_full
        row[f"latency_b{batch}_after_ms"] = 1e3 * t_small
        row[f"speedup_b{batch}"] = t_full / t_small
        row[f"speedup_b{batch}_over_macs_ratio"] = row[f"speedup_b{batch}"] / row["macs_ratio"]
    return row


def torch_speedup(name: str, repeats: int, batches: tuple[int, ...]) -> dict:
    """The same as `jax_speedup` for Torch-Pruning on the PyTorch twin."""
    model = torch_zoo.torch_model(name)
    before = torch_zoo.macs(model, name)
    rng = np.random.default_rng(0)
    images = {batch: torch_zoo.torch_images(name, batch, rng) for batch in batches}
    full = {
        batch: median_seconds(torch_zoo.predictor(model, images[batch]), repeats)[0]
        for batch in batches
    }
    torch_zoo.prune_half_l1(model, name)
    after = torch_zoo.macs(model, name)
    row: dict[str, Any] = {
        "model": name,
        "macs_before": before,
        "macs_after": after,
        "macs_ratio": before / after,
    }
    for batch in batches:
        small = median_seconds(torch_zoo.predictor(model, images[batch]), repeats)[0]
        row[f"latency_b{batch}_before_ms"] = 1e3 * full[batch]
        row[f"latency_b{batch}_after_ms"] = 1e3 * small
        row[f"speedup_b{batch}"] = full[batch] / small
        row[f"speedup_b{batch}_over_macs_ratio"] = row[f"speedup_b{batch}"] / row["macs_ratio"]
    return row
