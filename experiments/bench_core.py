"""Benchmark of the pruning core: graph and surgery time, and realised pruned speed-up.

Command (about 3 minutes on a 2-core CPU):

    python -m experiments.bench_core       # prints a table, writes results/bench_core.json

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
from pathlib import Path

import jax

from experiments.bench.core import graph_and_surgery, jax_speedup
from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_core.json")
    args = parser.parse_args()
    enable_compilation_cache()

    structure = [
        graph_and_surgery("vgg16", (1, 224, 224, 3), 1000, repeats=3),
        graph_and_surgery("resnet56", (1, 32, 32, 3), 10, repeats=3),
    ]
    speed = [
        jax_speedup("vgg_small", args.repeats, (1, 128)),
        jax_speedup("resnet56", args.repeats, (1, 128)),
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
