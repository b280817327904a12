"""Evaluating a population of candidate prunings: one vmapped, chunked call vs one call each.

Command:

    flock /tmp/jaxprune-heavy.lock python experiments/bench/population.py   # writes
        # experiments/results/blending/bench_population.json and prints the table

VGG-small (the shipped Fashion-MNIST base) on 256 validation images in one batch; 32
candidates, each removing a random half of every conv's kernels (the blending search's
workload: the masked network without fine-tuning). Variants, all compiled before timing and
timed in turns (median of the rounds), since the 2-core machine is shared:

* ``separate``: 32 calls of one jitted gated forward pass, one candidate's masks each;
* ``vmapped (chunk C)``: `blending_fitness.population_fitness`'s compiled function, C
  candidates per call (32 // C calls);
* ``plain``: the unmasked model's own jitted forward pass, 32 times, the floor a masked
  candidate cannot beat (gating adds a multiply per channel; masks do not remove work).

Result (8 minutes wall, most of it queued on the lock; 2-core CPU shared with other jobs, load
average 5-6; jax 0.10.2; median of 3 rounds; the table is in
experiments/results/blending/bench_population.md, raw times in bench_population.json):

    variant              s for 32 x 256 images   vs separate   share of plain throughput
    separate             5.24                    1.00x         0.57
    plain (unmasked)     3.01                    1.74x         1.00
    vmapped, chunk 8     9.54                    0.55x         0.32
    vmapped, chunk 16    9.19                    0.57x         0.33
    vmapped, chunk 32    14.12                   0.37x         0.21

On this CPU the vmapped population is about 1.8x *slower* than 32 separate calls: XLA:CPU runs
the batched convolutions of 8-32 candidates x 256 images (2048-8192 images of activations, up
to 800 MB per layer) memory-bound, while one candidate's 256 images stay in cache. The design
note's expectation for a CPU was about 1x; the one-call population is meant for accelerators,
where one wide call fills the device. On a CPU use a small `chunk_size` and `batch_size` (the
product bounds the working set). Gating itself costs 1.74x against the plain forward pass here.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from jaxprune.runtime import enable_compilation_cache

RESULTS = Path(__file__).resolve().parent.parent / "results" / "blending"
BASE = (
    Path(__file__).resolve().parent.parent.parent
    / "jaxprune/pretrained/vgg_small_fashion_mnist.msgpack"
)
POPULATION = 32
IMAGES = 256
ROUNDS = 3
CHUNKS = (8, 16, 32)


def main() -> None:
    enable_compilation_cache()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import checkpoint, data
    from jaxprune.gates import gated_call
    from jaxprune.graph import channel_graph
    from jaxprune.methods.blending_fitness import make_chunk_fn

    model, variables, _ = checkpoint.load_model_file(BASE)
    dataset = data.load(data.DataConfig(validation_examples=IMAGES))
    batch = next(data.preprocessed_batches(dataset, "validation", IMAGES, IMAGES))
    images, labels = batch["image"], batch["label"]
    graph = channel_graph(model.apply, variables, images[:1])
    rng = np.random.default_rng(0)
    groups = [g for g in graph.groups if g.kind == "conv"]
    stack = {}
    for g in groups:
        rows = np.zeros((POPULATION, g.size), np.float32)
        for p in range(POPULATION):
            rows[p, rng.permutation(g.size)[: g.size // 2]] = 1.0
        stack[g.name] = rows

    @jax.jit
    def one(variables, masks, images, labels):
        logits = gated_call(model.apply, graph, variables, images, masks, train=False)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    @jax.jit
    def plain(variables, images, labels):
        logits = model.apply(variables, images, train=False)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    chunk_fn = make_chunk_fn(model.apply, graph)
    singles = [{n: jnp.asarray(m[p]) for n, m in stack.items()} for p in range(POPULATION)]

    def run_separate():
        return [int(one(variables, masks, images, labels)) for masks in singles]

    def run_plain():
        return [int(plain(variables, images, labels)) for _ in range(POPULATION)]

    def chunked(size):
        parts = [
            {n: jnp.asarray(m[k : k + size]) for n, m in stack.items()}
            for k in range(0, POPULATION, size)
        ]

        def run():
            return [int(c) for part in parts for c in chunk_fn(variables, part, images, labels)[0]]

        return run

    variants = {"separate": run_separate, "plain": run_plain}
    variants |= {f"vmapped (chunk {c})": chunked(c) for c in CHUNKS}
    reference = run_separate()
    for name, fn in variants.items():  # compile, and check every variant counts the same
        found = fn()
        if name != "plain" and found != reference:
            raise AssertionError(f"{name} disagrees with separate evaluations")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, seconds in median.items():
        rows.append(
            {
                "variant": name,
                "seconds_for_32": seconds,
                "images_per_s": POPULATION * IMAGES / seconds,
                "speedup_vs_separate": median["separate"] / seconds,
                "fraction_of_plain_throughput": median["plain"] / seconds,
            }
        )
    lines = [
        f"| variant | s for {POPULATION} candidates x {IMAGES} images | candidate-images/s "
        "| vs separate | share of plain inference throughput |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['seconds_for_32']:.3f} | {r['images_per_s']:.0f} | "
            f"{r['speedup_vs_separate']:.2f}x | {r['fraction_of_plain_throughput']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    (RESULTS / "bench_population.json").write_text(
        json.dumps(
            {
                "model": "vgg_small",
                "population": POPULATION,
                "images": IMAGES,
                "rounds": ROUNDS,
                "jax": jax.__version__,
                "devices": [str(d) for d in jax.devices()],
                "load_average": load,
                "times_s": times,
                "rows": rows,
            },
            indent=1,
        )
    )
    (RESULTS / "bench_population.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
