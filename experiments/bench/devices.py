"""Criteria throughput over 1, 2 and 4 devices: how the data-parallel scoring scales.

Command (from the repository root; each device count runs in its own process, since XLA fixes
the device count at start):

    python -m experiments.bench.devices [--counts 1,2,4] [--batches 8]

On CPUs the devices are simulated (``--xla_force_host_platform_device_count``): they share the
machine's cores, so the ratios measure the cost of splitting batches and reducing statistics
over devices, not a speed-up; on a machine with N accelerators (``--counts`` up to N, no
simulation) they measure the speed-up. Each process scores VGG-small (random weights, batch
128, 28x28x1) with Taylor, activation_std and the exact oracle over `batches` batches, timed
after one warm-up pass, and prints images per second; the table gives each count's throughput
relative to one device. Writes experiments/results/bench/devices.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench"
CRITERIA = ("taylor", "activation_std", "oracle_abs")


def measure(batches: int) -> dict:
    """Images per second of each criterion on this process's devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprune.criteria import ScoringContext, score
    from jaxprune.graph import channel_graph
    from jaxprune.model import Model
    from jaxprune.models import build_model
    from jaxprune.runtime import enable_compilation_cache

    enable_compilation_cache()
    module = build_model("vgg_small", 10)
    x = jnp.zeros((1, 28, 28, 1))
    variables = module.init(jax.random.key(0), x, train=False)
    model = Model.linen(module, x, variables=variables)
    graph = channel_graph(model.apply_fn, variables, x, **model.eval_kwargs)
    context = ScoringContext(model.apply_fn, graph, apply_kwargs=model.eval_kwargs)
    rng = np.random.default_rng(0)
    data = [
        {
            "image": rng.normal(size=(128, 28, 28, 1)).astype(np.float32),
            "label": rng.integers(0, 10, 128).astype(np.int32),
        }
        for _ in range(batches)
    ]
    found = {}
    for name in CRITERIA:
        score(name, context, variables, data[:1])  # compile
        began = time.perf_counter()
        score(name, context, variables, data)
        found[name] = batches * 128 / (time.perf_counter() - began)
    return {"devices": jax.device_count(), "images_per_s": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4", help="device counts, comma-separated")
    parser.add_argument("--batches", type=int, default=8, help="batches of 128 per criterion")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.batches)))
        return
    simulated = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"
    runs = []
    for count in (int(c) for c in args.counts.split(",")):
        env = dict(os.environ)
        if simulated:
            env.update(
                JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={count}"
            )
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(count))
        output = subprocess.run(
            [sys.executable, "-m", "experiments.bench.devices", "--child",
             f"--batches={args.batches}"],
            env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        runs.append(json.loads(output.strip().splitlines()[-1]))
    base = runs[0]["images_per_s"]
    kind = "simulated CPU devices sharing the cores" if simulated else "accelerators"
    lines = [
        f"Criteria throughput relative to {runs[0]['devices']} device(s), VGG-small, batch 128, "
        f"{args.batches} batches ({kind}):",
        "",
        "| devices | " + " | ".join(CRITERIA) + " |",
        "|---:|" + "---:|" * len(CRITERIA),
    ]
    for run in runs:
        cells = " | ".join(
            f"{run['images_per_s'][n]:.0f} img/s ({run['images_per_s'][n] / base[n]:.2f}x)"
            for n in CRITERIA
        )
        lines.append(f"| {run['devices']} | {cells} |")
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "devices.md").write_text(table)
    (RESULTS / "devices.json").write_text(
        json.dumps({"simulated": simulated, "batches": args.batches, "runs": runs}, indent=1)
    )


if __name__ == "__main__":
    main()
