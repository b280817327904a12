"""Benchmark of the criteria: the exact oracle for every channel, and Taylor against a train step.

Command:

    python experiments/bench_criteria.py     # prints tables, writes results/bench_criteria.json

What it measures, in one process (VGG-small, 28x28x1, random weights; Fashion-MNIST test images
when the Debian package is installed, random images otherwise):

* oracle: the loss change of removing each channel alone, for every channel of every group, on
  512 images. `removal_losses` per group (the prefix before the group computed once, candidates
  one after another; "auto" applies the one-input-channel correction at the consumer conv where
  it can, "mask" re-runs everything after the gate) against a loop of one compiled masked
  forward pass per channel. Every loop call costs the same (one compiled program, same shapes),
  so the loop is timed on `--loop-sample` channels and multiplied by the channel count.
* taylor: `score("taylor", ...)` on one batch of 128 (forward + gradient with respect to the
  activations) against one SGD train step (forward + backward with respect to the parameters +
  update, BatchNorm in training mode) on the same batch.

Result on the 2-core CPU (jax 0.10.2, 140 s wall time; other jobs shared the CPU, load average
about 3.5, so single timings are noisy):

    group     chan   loop s   auto s  auto x   mask s  mask x
    conv1       32    11.47     8.65    1.33    15.92    0.72
    conv2       32    11.47     9.06    1.27    10.72    1.07
    conv3       64    22.95    11.94    1.92    16.98    1.35
    conv4       64    22.95     6.41    3.58    12.06    1.90
    conv5      128    45.90     2.70   17.01    11.74    3.91
    conv6      128    45.90     1.20   38.18     1.21   37.85
    fc1        512   183.59     0.44  415.18     0.43  431.36
    conv groups       160.64    39.97    4.02    68.63    2.34
    all groups        344.24    40.41    8.52    69.05    4.99
    taylor, batch 128: 318 ms; train step 700 ms; ratio 0.45

The loop is 358.6 ms per masked forward of 512 images. The exact oracle over the conv groups is
4.0x faster than the loop (the target was 5x); the arithmetic floor of this scheme is
about 4.9x (per image, 2.7 G MACs of suffixes against 13.3 G for the loop), and the early groups
cannot do better because almost the whole network lies after them (conv1: 1.33x, its floor).
Taylor costs 0.45 of a train step (target <= 1.3). The train step is now
``jaxprune.train.train_step`` itself (it was a local copy without the metrics); on an idle CPU
``python -m experiments.bench`` measured Taylor 156 ms against 246 ms for it: 0.63.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import train
from jaxprune.criteria import ScoringContext, removal_losses, score
from jaxprune.data import read_idx
from jaxprune.gates import gated_call
from jaxprune.graph import channel_graph
from jaxprune.models import build_model
from jaxprune.models.random_init import random_variables
from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).parent / "results"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def images(count: int) -> tuple[jax.Array, jax.Array, str]:
    """(images, labels, source): Fashion-MNIST test images if present, else random ones."""
    files = (
        FASHION_MNIST / "t10k-images-idx3-ubyte.gz",
        FASHION_MNIST / "t10k-labels-idx1-ubyte.gz",
    )
    if all(f.exists() for f in files):
        x = read_idx(files[0])[:count].astype(np.float32)[..., None] / 255.0
        y = read_idx(files[1])[:count].astype(np.int32)
        return jnp.asarray((x - 0.286) / 0.353), jnp.asarray(y), "fashion-mnist t10k"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, 28, 28, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, 10, count, dtype=np.int32)), "random"


def timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_oracle(model, variables, graph, x, y, modes, loop_sample):
    kwargs = {"train": False}

    def summed_loss(out):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(out, y))

    @jax.jit
    def masked_loss(v, masks):
        return summed_loss(gated_call(model.apply, graph, v, x, masks, **kwargs))

    ones = {g.name: jnp.ones(g.size) for g in graph}
    compile_loop = timed(masked_loss, variables, ones)
    calls = []
    for c in range(loop_sample):
        group = graph.groups[c % len(graph)]
        mask = ones[group.name].at[c % group.size].set(0.0)
        calls.append(timed(masked_loss, variables, {**ones, group.name: mask}))
    per_call = float(np.median(calls))

    rows = []
    for group in graph:
        row = {"group": group.name, "channels": group.size, "loop_s": per_call * group.size}
        for mode in modes:

            def oracle(v, name=group.name, mode=mode):
                return removal_losses(
                    model.apply, graph, v, x, summed_loss, name, batch_size=1, mode=mode, **kwargs
                )

            start = time.perf_counter()
            compiled = jax.jit(oracle).lower(variables).compile()
            row[f"{mode}_compile_s"] = time.perf_counter() - start
            row[f"{mode}_s"] = timed(compiled, variables)
        rows.append(row)
    return {"loop_per_call_s": per_call, "loop_compile_s": compile_loop, "groups": rows}


def bench_taylor(model, variables, graph, x, y):
    context = ScoringContext(model.apply, graph)
    batch = {"image": x, "label": y}
    first = timed(lambda: score("taylor", context, variables, batch))
    taylor_s = float(
        np.median([timed(lambda: score("taylor", context, variables, batch)) for _ in range(3)])
    )

    # The library's own train step (forward, backward with respect to the parameters, SGD
    # update, batch statistics in training mode) on the same batch.
    tx = optax.sgd(0.01, momentum=0.9)
    state = train.create_train_state(model, tx, jax.random.key(0), x[:1])
    step_first = timed(train.train_step, state, batch)
    step_s = float(np.median([timed(train.train_step, state, batch) for _ in range(3)]))
    return {
        "taylor_s": taylor_s,
        "taylor_first_call_s": first,
        "train_step_s": step_s,
        "train_step_first_call_s": step_first,
        "ratio": taylor_s / step_s,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images for the oracle")
    parser.add_argument("--taylor-batch", type=int, default=128)
    parser.add_argument("--modes", default="auto,mask", help="removal modes to time")
    parser.add_argument("--loop-sample", type=int, default=28, help="loop calls timed")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_criteria.json")
    args = parser.parse_args(argv)
    enable_compilation_cache()

    model = build_model("vgg_small", 10)
    x, y, source = images(max(args.images, args.taylor_batch))
    variables = random_variables(model, x[:1], gain=np.sqrt(2.0))
    graph = channel_graph(model.apply, variables, x[:1])
    modes = args.modes.split(",")

    start = time.perf_counter()
    oracle = bench_oracle(
        model, variables, graph, x[: args.images], y[: args.images], modes, args.loop_sample
    )
    taylor = bench_taylor(model, variables, graph, x[: args.taylor_batch], y[: args.taylor_batch])
    total = time.perf_counter() - start

    conv = [r for r in oracle["groups"] if graph[r["group"]].kind == "conv"]
    summary = {}
    for label, rows in (("conv groups", conv), ("all groups", oracle["groups"])):
        loop = sum(r["loop_s"] for r in rows)
        summary[label] = {"loop_s": loop}
        for mode in modes:
            t = sum(r[f"{mode}_s"] for r in rows)
            summary[label][f"{mode}_s"] = t
            summary[label][f"{mode}_speedup"] = loop / t

    print(
        f"VGG-small, {args.images} images ({source}), jax {jax.__version__}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    )
    print(
        f"loop: {oracle['loop_per_call_s'] * 1e3:.1f} ms per masked forward "
        f"(median of {args.loop_sample})"
    )
    header = f"{'group':8} {'chan':>5} {'loop s':>8} " + " ".join(
        f"{m + ' s':>8} {m + ' x':>7}" for m in modes
    )
    print(header)
    for r in oracle["groups"]:
        cells = " ".join(f"{r[m + '_s']:8.2f} {r['loop_s'] / r[m + '_s']:7.2f}" for m in modes)
        print(f"{r['group']:8} {r['channels']:5d} {r['loop_s']:8.2f} {cells}")
    for label, s in summary.items():
        cells = " ".join(f"{s[m + '_s']:8.2f} {s[m + '_speedup']:7.2f}" for m in modes)
        print(f"{label:14} {s['loop_s']:8.2f} {cells}")
    print(
        f"taylor, batch {args.taylor_batch}: {taylor['taylor_s'] * 1e3:.0f} ms; train step "
        f"{taylor['train_step_s'] * 1e3:.0f} ms; ratio {taylor['ratio']:.2f}"
    )
    print(f"benchmark wall time {total:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": "vgg_small",
        "images": args.images,
        "data": source,
        "jax": jax.__version__,
        "oracle": oracle,
        "oracle_summary": summary,
        "taylor": taylor,
        "wall_s": total,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
