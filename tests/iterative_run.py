"""Runs a tiny iterative pruning for tests/test_iterative.py's kill-and-resume test.

Usage: python tests/iterative_run.py WORKDIR

LeNet-5 on 320 Fashion-MNIST training images, 2 channels per step, 4 updates between steps, a
physical shrink every 2 steps, 6 fine-tuning updates at the end. Every training batch is
delayed by `STEP_DELAY_S`, so the test can kill the process (SIGKILL) between checkpoints; the
delay is part of every run, killed or not. The result goes to WORKDIR/result.json (history and
summary without timings) and WORKDIR/final.npz (the pruned variables).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kill_resume import write_pruning_result
from slow_data import DelayedDataset

from jaxprune.runtime import enable_compilation_cache

STEP_DELAY_S = 0.05
BASE = Path(__file__).resolve().parent.parent / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


def config():
    from jaxprune.methods.iterative import IterativeConfig

    return IterativeConfig(
        criterion="taylor",
        channels_per_step=2,
        updates_per_step=4,
        target_flops=0.5,
        shrink_every=2,
        final_updates=6,
        batch_size=32,
        eval_batch_size=64,
    )


def main(workdir: str) -> None:
    enable_compilation_cache()
    from jaxprune import checkpoint, data
    from jaxprune.methods.iterative import iterative_prune

    _, variables, _ = checkpoint.load_model_file(BASE)
    dataset = data.load(
        data.DataConfig(train_examples=320, validation_examples=128, test_examples=128)
    )
    result = iterative_prune(
        config(), "lenet5", variables, DelayedDataset(dataset, STEP_DELAY_S), workdir=workdir
    )
    write_pruning_result(workdir, result)


if __name__ == "__main__":
    main(sys.argv[1])
