"""Evaluating a population of candidate prunings: chunk size x batch size, against one call each.

Command:

    flock /tmp/jaxprune-heavy.lock python experiments/bench/population.py   # writes
        # experiments/results/blending/bench_population.{md,json} and prints the tables

VGG-small (the shipped Fashion-MNIST base) on 256 validation images; 32 candidates, each
removing a random half of every conv's kernels (the blending search's workload: the masked
network without fine-tuning). Variants, all compiled (and checked to count the same correct
images per candidate) before timing, then timed in turns (median of 3 rounds), since the 2-core
machine is shared:

* ``separate``: 32 calls of one jitted gated forward pass on all 256 images, one candidate's
  masks each;
* ``vmapped`` (chunk C, batch B): `blending_fitness.population_fitness` with ``chunk_size=C``
  on batches of B images (the same 256 images in 256 / B batches): C candidates per compiled
  call, (32 / C) x (256 / B) calls; C in 1, 2, 4, 8, 16, 32 and B in 64, 128, 256, so the
  images of activations per call, C x B, run from 64 to 8192;
* ``plain``: the unmasked model's own jitted forward pass, 32 times (gating adds a multiply per
  channel; masks do not remove work).

Result (11 minutes wall, started at load average 1.2, 2-core CPU shared with other jobs: a test
run of another module overlapped the first two rounds, the third ran nearly alone; jax 0.10.2;
the full table is experiments/results/blending/bench_population.md, every round's times are in
bench_population.json). Candidate-images/s of `population_fitness` (median of 3 rounds):

    chunk   batch 64   batch 128   batch 256
    1       1531       1573        2031
    2       1291       1121        1063
    4        873       1086         937
    8       1001        970         821
    16       935        851         818
    32       875        797         560
    separate 1621, plain (unmasked) 1605 (its quiet third round alone: 3228)

One candidate per call is the fastest at every batch size, by 1.2-3.6x over any wider chunk;
the third, quietest round agrees (chunk 1: 2.65-3.36 s for the 8192 candidate-images; chunk 2:
5.2-7.5 s; chunk 32 at batch 256: 11.2 s). The working set C x B alone does not explain it:
2 candidates x 64 images (128 per call) ran slower than 1 x 256. The compiled chunk of 2 runs
the convolutions on C x B images with shared kernels as the chunk of 1 does, but adds copies
and a transpose of activations (the candidate axis in the layouts), and XLA:CPU gains nothing
from the wider call on 2 cores. Among batch sizes at chunk 1 the order is not consistent (the
medians favour 256, the quiet round 128), so it supports no change of the batch size.
Hence `blending_fitness.auto_chunk_size` gives 1 candidate per device on a CPU, and
`BlendingConfig.chunk_size` defaults to 0 (automatic); the accelerator rule (up to 32 per call)
is not measured here.

Tried and rejected: folding the candidates into the batch. Instead of a vmap over candidates, tile
the B images C times and gate each of the C x B examples with its own candidate's masks, so
the network runs one plain batch (no candidate axis in the layouts). A prototype (not kept in
jaxprune) ran through `population_fitness` like the vmapped rows, in two forms: per-example
masks ``(C x B, channels)`` broadcast over the spatial axes at each gate point (``folded``),
and masks ``(C, channels)`` applied to the activations reshaped to ``(C, B, ...)``
(``grouped``). Both counted the same correct images per candidate as the vmapped chunk of 1
(losses within 1e-5 relative). Same workload, compiled first, in turns, median of 3 rounds,
each form in its own run (about 3.5 minutes each, load average 1.5-2.3, a quieter machine
than the table above, so compare within a run: every run has its own chunk 1 vmapped and plain
rows). Candidate-images/s:

    run 1               batch 64   batch 128   batch 256
    vmapped chunk 1     2505       3031        2540
    folded C=1          2275       2188        2238
    folded C=2          3042       2525        2338
    folded C=4          2508       2373        2285
    folded C=8          2316       2282        2234
    plain 3210

    run 2               batch 64   batch 128   batch 256
    vmapped chunk 1     2603       2698        2496
    grouped C=1         2539       2191        2235
    grouped C=2         2134       2037        1788
    grouped C=4         2022       1884        1696
    plain 3261

Folding gains only where the batch is small: 2 candidates x 64 images (3042) is as fast as
one candidate on 128 images (3031), that is, the gain is that of a larger batch, which the
vmapped chunk of 1 gets by itself. At the blending default (250 images per batch) every folded
form was 0.68-0.92x the vmapped chunk of 1, so the CPU default stays one candidate per call.
These rows are `FOLDED_PROTOTYPE` below, appended to the results on every run of this script
(which does not re-measure them).
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
CHUNKS = (1, 2, 4, 8, 16, 32)
BATCHES = (64, 128, 256)
# The folded prototype's measurements (see the docstring): candidate-images/s, median of 3
# rounds, per run, per variant, per batch size; not re-measured by this script.
FOLDED_PROTOTYPE = {
    "run 1 (per-example masks)": {
        "plain": {256: 3210},
        "vmapped chunk 1": {64: 2505, 128: 3031, 256: 2540},
        "folded C=1": {64: 2275, 128: 2188, 256: 2238},
        "folded C=2": {64: 3042, 128: 2525, 256: 2338},
        "folded C=4": {64: 2508, 128: 2373, 256: 2285},
        "folded C=8": {64: 2316, 128: 2282, 256: 2234},
    },
    "run 2 (activations reshaped to (C, B, ...))": {
        "plain": {256: 3261},
        "vmapped chunk 1": {64: 2603, 128: 2698, 256: 2496},
        "grouped C=1": {64: 2539, 128: 2191, 256: 2235},
        "grouped C=2": {64: 2134, 128: 2037, 256: 1788},
        "grouped C=4": {64: 2022, 128: 1884, 256: 1696},
    },
}


def _folded_lines() -> list[str]:
    lines = [
        "",
        "Tried and rejected: candidates folded into the batch (a prototype, measured apart from",
        "this script's runs; see experiments/bench/population.py). Candidate-images/s:",
    ]
    for run, variants in FOLDED_PROTOTYPE.items():
        lines += [
            "",
            f"| {run} | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
            "|---|" + "---:|" * len(BATCHES),
        ]
        for name, speeds in variants.items():
            cells = [str(speeds.get(b, "")) for b in BATCHES]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _load_average() -> list[str]:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else []


def main() -> None:
    started = time.perf_counter()
    load_before = _load_average()
    enable_compilation_cache()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import checkpoint, data
    from jaxprune.gates import gated_call
    from jaxprune.graph import channel_graph
    from jaxprune.methods.blending_fitness import make_chunk_fn, population_fitness

    model, variables, _ = checkpoint.load_model_file(BASE)
    dataset = data.load(data.DataConfig(validation_examples=IMAGES))
    batched = {
        b: list(data.preprocessed_batches(dataset, "validation", b, IMAGES)) for b in BATCHES
    }
    whole = batched[IMAGES][0]
    images, labels = whole["image"], whole["label"]
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

    def chunked(chunk, batch):
        def run():
            found = population_fitness(
                chunk_fn, variables, stack, batched[batch], chunk_size=chunk, deduplicate=False
            )
            return [round(a * IMAGES) for a in found.accuracy]

        return run

    variants = {("separate", 1, IMAGES): run_separate, ("plain", 1, IMAGES): run_plain}
    for batch in BATCHES:
        for chunk in CHUNKS:
            variants[("vmapped", chunk, batch)] = chunked(chunk, batch)
    reference = run_separate()
    for key, fn in variants.items():  # compile, and check every variant counts the same
        found = fn()
        if key[0] != "plain" and found != reference:
            raise AssertionError(f"{key} disagrees with separate evaluations")
    times: dict[tuple, list[float]] = {key: [] for key in variants}
    for _ in range(ROUNDS):  # in turns, so a burst of load hits every variant alike
        for key, fn in variants.items():
            began = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - began)
    median = {key: statistics.median(t) for key, t in times.items()}
    separate = median[("separate", 1, IMAGES)]
    plain_s = median[("plain", 1, IMAGES)]
    rows = []
    for (kind, chunk, batch), seconds in median.items():
        rows.append(
            {
                "variant": kind,
                "chunk": chunk,
                "batch": batch,
                "working_set_images": chunk * batch,
                "seconds_for_32": seconds,
                "images_per_s": POPULATION * IMAGES / seconds,
                "speedup_vs_separate": separate / seconds,
                "fraction_of_plain_throughput": plain_s / seconds,
            }
        )
    lines = [
        f"{POPULATION} candidates x {IMAGES} images (VGG-small), median of {ROUNDS} rounds.",
        "",
        "| variant | chunk | batch | chunk x batch | s | candidate-images/s | vs separate "
        "| share of plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['chunk']} | {r['batch']} | {r['working_set_images']} | "
            f"{r['seconds_for_32']:.3f} | {r['images_per_s']:.0f} | "
            f"{r['speedup_vs_separate']:.2f}x | {r['fraction_of_plain_throughput']:.2f} |"
        )
    lines += [
        "",
        "Candidate-images/s of `population_fitness`, chunk (rows) by batch (columns):",
        "",
        "| chunk | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
        "|---:|" + "---:|" * len(BATCHES),
    ]
    for chunk in CHUNKS:
        cells = [f"{POPULATION * IMAGES / median[('vmapped', chunk, b)]:.0f}" for b in BATCHES]
        lines.append(f"| {chunk} | " + " | ".join(cells) + " |")
    lines += _folded_lines()
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_population.json").write_text(
        json.dumps(
            {
                "model": "vgg_small",
                "population": POPULATION,
                "images": IMAGES,
                "rounds": ROUNDS,
                "jax": jax.__version__,
                "devices": [str(d) for d in jax.devices()],
                "load_average_before": load_before,
                "load_average_after": _load_average(),
                "wall_s": time.perf_counter() - started,
                "times_s": {f"{k} chunk {c} batch {b}": t for (k, c, b), t in times.items()},
                "rows": rows,
                "folded_prototype_images_per_s": FOLDED_PROTOTYPE,
            },
            indent=1,
        )
    )
    (RESULTS / "bench_population.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
