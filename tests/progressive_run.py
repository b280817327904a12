"""Runs a tiny progressive simplification for tests/test_progressive_resume.py's kill test.

Usage: python tests/progressive_run.py WORKDIR

LeNet-5 on 320 Fashion-MNIST training images: both conv layers lose a quarter of their kernels
(objective criterion), each followed by progressive retraining on 96 images (batch 8), then one
epoch of final fine-tuning with a re-initialised head. Every training batch is delayed by
`STEP_DELAY_S`, so the test can kill the process (SIGKILL) between checkpoints. The result goes
to WORKDIR/result.json (history and summary without timings) and WORKDIR/final.npz.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kill_resume import write_pruning_result
from slow_data import DelayedDataset

from jaxprune.runtime import enable_compilation_cache

STEP_DELAY_S = 0.03
BASE = Path(__file__).resolve().parent.parent / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


def config():
    from jaxprune.methods.progressive import ProgressiveConfig

    return ProgressiveConfig(
        ratio=0.25,
        score_examples=64,
        retrain_examples=96,
        learning_rates=((0, 1e-3), (1, 1e-4)),
        final_finetune_epochs=1,
        final_examples=64,
        final_batch_size=16,
        reinit_head=True,
        eval_examples=64,
    )


def main(workdir: str) -> None:
    enable_compilation_cache()
    from jaxprune import checkpoint, data
    from jaxprune.methods.progressive import progressive_prune

    _, variables, _ = checkpoint.load_model_file(BASE)
    dataset = data.load(
        data.DataConfig(train_examples=320, validation_examples=64, test_examples=64)
    )
    result = progressive_prune(
        config(), "lenet5", variables, DelayedDataset(dataset, STEP_DELAY_S), workdir=workdir
    )
    write_pruning_result(workdir, result)


if __name__ == "__main__":
    main(sys.argv[1])
