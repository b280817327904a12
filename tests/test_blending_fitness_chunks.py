"""The chunk size of the population fitness: the automatic rule, and that the chunking never
changes a candidate's accuracy or loss."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint, data
from jaxprune.graph import channel_graph
from jaxprune.methods.blending_fitness import (
    ACCELERATOR_CHUNK,
    ACCELERATOR_MAX_IMAGES,
    CPU_CHUNK,
    auto_chunk_size,
    make_chunk_fn,
    population_fitness,
)

LENET = Path(__file__).resolve().parent.parent / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


@pytest.fixture(scope="module")
def setup():
    model, variables, _ = checkpoint.load_model_file(LENET)
    dataset = data.load(data.DataConfig(train_examples=64, validation_examples=96))
    batches = list(data.preprocessed_batches(dataset, "validation", 32, 96))
    graph = channel_graph(model.apply, variables, batches[0]["image"][:1])
    rng = np.random.default_rng(3)
    masks = {}
    for group in ("conv1", "conv2"):
        size = graph[group].size
        rows = np.zeros((7, size), np.float32)
        for p in range(7):
            rows[p, rng.permutation(size)[: size // 2]] = 1.0
        masks[group] = rows
    return make_chunk_fn(model.apply, graph), variables, masks, batches


@pytest.mark.parametrize("batch_size", [1, 32, 64, 250, 1000])
def test_cpu_evaluates_one_candidate_per_call_and_device(batch_size):
    assert CPU_CHUNK == 1  # the measured rule
    assert auto_chunk_size("cpu", batch_size) == 1
    assert auto_chunk_size("CPU", batch_size, devices=4) == 4  # sharded: one per device


@pytest.mark.parametrize("platform", ["gpu", "cuda", "rocm", "tpu", "METAL"])
def test_accelerators_get_a_wide_chunk_bounded_by_images_per_call(platform):
    assert (ACCELERATOR_CHUNK, ACCELERATOR_MAX_IMAGES) == (32, 8192)
    for batch_size, expected in [(1, 32), (64, 32), (250, 32), (256, 32), (1000, 8), (4096, 2)]:
        assert auto_chunk_size(platform, batch_size) == expected
    assert auto_chunk_size(platform, 10_000) == 1  # never zero
    assert auto_chunk_size(platform, 64, devices=8) == 32
    assert auto_chunk_size(platform, 64, devices=3) == 33  # a multiple of the devices
    assert auto_chunk_size(platform, 10_000, devices=4) == 4


@pytest.mark.parametrize(("batch_size", "devices"), [(0, 1), (64, 0), (-1, 2)])
def test_bad_batch_or_device_count_is_refused(batch_size, devices):
    with pytest.raises(ValueError, match="must be >= 1"):
        auto_chunk_size("cpu", batch_size, devices=devices)


def test_negative_chunk_size_is_refused(setup):
    chunk_fn, variables, masks, batches = setup
    with pytest.raises(ValueError, match="0 for automatic"):
        population_fitness(chunk_fn, variables, masks, batches, chunk_size=-1)


def test_chunk_1_3_and_auto_give_the_same_fitness(setup):
    chunk_fn, variables, masks, batches = setup
    widths = []

    def recording(variables, chunk, images, labels):
        widths.append(next(iter(chunk.values())).shape[0])
        return chunk_fn(variables, chunk, images, labels)

    found = {
        size: population_fitness(recording, variables, masks, batches, chunk_size=size)
        for size in (1, 3, 0)
    }
    # 7 candidates on 3 batches: 7 calls of 1, 3 of 3 (the last padded), and auto on the CPU
    # (these tests run on one CPU device) 7 of 1.
    assert widths == [1] * 21 + [3] * 9 + [1] * 21
    # The reference: each candidate on its own, unbatched over candidates, as plain sums.
    images = jnp.concatenate([b["image"] for b in batches])
    labels = jnp.concatenate([b["label"] for b in batches])
    for size, fitness in found.items():
        assert fitness.evaluated == 7
        np.testing.assert_array_equal(fitness.accuracy, found[1].accuracy, err_msg=f"{size}")
        # XLA:CPU's convolutions batched over C candidates may round differently in the last
        # float32 bit (measured: 1e-7 relative), so losses agree to float32 precision.
        np.testing.assert_allclose(fitness.loss, found[1].loss, rtol=1e-6, err_msg=f"{size}")
    hits, _ = chunk_fn(variables, {g: jnp.asarray(m[:1]) for g, m in masks.items()}, images, labels)
    assert found[0].accuracy[0] == pytest.approx(float(hits[0]) / 96, abs=1e-12)
    assert len(set(found[0].accuracy.tolist())) > 1  # the candidates do differ
