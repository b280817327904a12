"""Reads batches of Fashion-MNIST in one or several processes; used by tests/test_sharding.py.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/process_reading.py OUT

Several processes: set JAX_COORDINATOR_ADDRESS, JAXPRUNE_NUM_PROCESSES and JAXPRUNE_PROCESS_ID
in each (`jaxprune.runtime.initialize_distributed`); process i writes OUT.<i>.npz, a single
process OUT.npz.

Counts the records each process reads from storage, per batch, and saves every batch whole
(gathered from every process): an epoch of shuffled training batches of 8 (the last of the
20 examples has 4, which still splits over 4 devices), and the evaluation batches of 8 of the
14 validation images, preprocessed (the last batch, of 6, does not split over 4 devices).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(out: str) -> None:
    if "JAXPRUNE_NUM_PROCESSES" in os.environ:
        from jaxprune.runtime import initialize_distributed

        initialize_distributed()
    import jax

    from jaxprune import data
    from jaxprune.sharding import to_host

    dataset = data.load(
        data.DataConfig(name="fashion_mnist", train_examples=20, validation_examples=14)
    )
    reads: list[int] = []
    for split in dataset.splits.values():
        read = split.read

        def counted(positions, read=read):
            reads.append(len(positions))
            return read(positions)

        object.__setattr__(split, "read", counted)
    saved: dict[str, np.ndarray] = {}
    kinds = []
    batches = dataset.iterate("train", 8, seed=3, epoch=1, drop_remainder=False)
    for index, batch in enumerate(batches):
        kinds.append(type(batch["image"]).__name__)
        for name, value in to_host(batch).items():
            saved[f"train/{index}/{name}"] = value
    train_reads = list(reads)
    for index, batch in enumerate(data.preprocessed_batches(dataset, "validation", 8)):
        for name, value in to_host(batch).items():
            saved[f"validation/{index}/{name}"] = value
    summary = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "train_reads": train_reads,
        "validation_reads": reads[len(train_reads) :],
        "train_kinds": kinds,
    }
    suffix = f".{jax.process_index()}" if jax.process_count() > 1 else ""
    np.savez(f"{out}{suffix}.npz", summary=json.dumps(summary), **saved)


if __name__ == "__main__":
    main(sys.argv[1])
