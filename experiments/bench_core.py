"""Benchmark of the pruning core: graph and surgery time, and realised pruned speed-up.

Command (about 3 minutes on a 2-core CPU):

    python experiments/bench_core.py            # prints a table, writes results/bench_core.json

What it measures, all in one process so the ratios share one machine state:

* graph: `channel_graph` (trace + analysis) on VGG-16 at 224x224 (1000 classes) and ResNet-56 at
  32x32; surgery: `prune` keeping 50% of every group (by the L1 norm of the producer kernels).
* speed-up: VGG-small (28x28x1) and ResNet-56 (32x32x3) with 50% of the channels of every group
  removed: the MACs ratio, and the measured CPU inference speed-up (median of jitted calls) at
  batch 1 and batch 128. The speed-up should reach at least 0.8 of the MACs ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import cost, criteria
from jaxprune.graph import channel_graph
from jaxprune.methods.oneshot import OneShotConfig, keep_from_scores
from jaxprune.models import build_model
from jaxprune.models.random_init import random_variables
from jaxprune.runtime import enable_compilation_cache
from jaxprune.surgery import prune

RESULTS = Path(__file__).parent / "results"


def half_by_l1(graph, variables):
    """Keep the half of each group's channels with the largest L1 norm (Li et al. 2017)."""
    context = criteria.ScoringContext(apply_fn=None, graph=graph)
    scores = criteria.score("l1", context, variables)
    return keep_from_scores(graph, scores, OneShotConfig(ratio=0.5, scope="all"))


def timed(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree_util.tree_leaves(out))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def bench_graph_and_surgery(name, shape, num_classes):
    model = build_model(name, num_classes)
    x = jnp.zeros(shape)
    variables = random_variables(model, x)
    graph_s, graph = timed(lambda: channel_graph(model.apply, variables, x), repeats=3)
    keep = half_by_l1(graph, variables)
    surgery_s, _ = timed(lambda: prune(variables, graph, keep).variables, repeats=3)
    return {
        "model": name,
        "input": list(shape),
        "groups": len(graph),
        "graph_s": graph_s,
        "surgery_s": surgery_s,
    }


def bench_speedup(name, image_shape, num_classes, repeats):
    model = build_model(name, num_classes)
    x1 = jnp.zeros((1, *image_shape))
    variables = random_variables(model, x1)
    graph = channel_graph(model.apply, variables, x1)
    pruned = prune(variables, graph, half_by_l1(graph, variables))
    small = build_model(name, num_classes, pruned.widths)
    before = cost.count(model.apply, variables, x1)
    after = cost.count(small.apply, pruned.variables, x1)
    row = {
        "model": name,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "macs_ratio": before.macs / after.macs,
        "params_before": before.params,
        "params_after": after.params,
    }
    for batch in (1, 128):
        x = jax.random.normal(jax.random.key(0), (batch, *image_shape))
        t_full = cost.latency(model.apply, variables, x, repeats=repeats).median
        t_small = cost.latency(small.apply, pruned.variables, x, repeats=repeats).median
        row[f"latency_b{batch}_before_ms"] = 1e3 * t_full
        row[f"latency_b{batch}_after_ms"] = 1e3 * t_small
        row[f"speedup_b{batch}"] = t_full / t_small
        row[f"speedup_b{batch}_over_macs_ratio"] = (t_full / t_small) / row["macs_ratio"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_core.json")
    args = parser.parse_args()
    enable_compilation_cache()

    structure = [
        bench_graph_and_surgery("vgg16", (1, 224, 224, 3), 1000),
        bench_graph_and_surgery("resnet56", (1, 32, 32, 3), 10),
    ]
    speed = [
        bench_speedup("vgg_small", (28, 28, 1), 10, args.repeats),
        bench_speedup("resnet56", (32, 32, 3), 10, args.repeats),
    ]
    print("graph + surgery (50% of every group, L1)")
    print(f"{'model':<10} {'groups':>6} {'graph s':>8} {'surgery s':>9}")
    for r in structure:
        print(f"{r['model']:<10} {r['groups']:>6} {r['graph_s']:>8.3f} {r['surgery_s']:>9.3f}")
    print("\npruned inference, 50% of every group")
    print(
        f"{'model':<10} {'MACs':>16} {'ratio':>6} {'b1 ms':>13} {'b1 x':>6} "
        f"{'b128 ms':>15} {'b128 x':>6} {'x/MACs b1':>9} {'x/MACs b128':>11}"
    )
    for r in speed:
        print(
            f"{r['model']:<10} {r['macs_before'] / 1e6:>7.1f}->{r['macs_after'] / 1e6:>6.1f}M "
            f"{r['macs_ratio']:>6.2f} "
            f"{r['latency_b1_before_ms']:>6.2f}->{r['latency_b1_after_ms']:>5.2f} "
            f"{r['speedup_b1']:>6.2f} "
            f"{r['latency_b128_before_ms']:>7.1f}->{r['latency_b128_after_ms']:>6.1f} "
            f"{r['speedup_b128']:>6.2f} {r['speedup_b1_over_macs_ratio']:>9.2f} "
            f"{r['speedup_b128_over_macs_ratio']:>11.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"structure": structure, "speedup": speed, "device": str(jax.devices()[0])}, indent=2
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
