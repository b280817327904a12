"""Runs a tiny progressive simplification for tests/test_progressive_resume.py's kill test.

Usage: python tests/progressive_run.py WORKDIR

LeNet-5 on 320 Fashion-MNIST training images: both conv layers lose a quarter of their kernels
(objective criterion, floored: 1 of 6 and 4 of 16), each followed by progressive retraining on
96 images (batch 8), then one epoch of final fine-tuning with every dense layer re-initialised.
Every training batch is delayed by `STEP_DELAY_S`, so the test can kill the process (SIGKILL)
between checkpoints. The result goes to WORKDIR/result.json (history, summary and keep, without
timings) and WORKDIR/final.npz.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kill_resume import save_variables, without_times
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
        final_learning_rate=1e-3,
        final_reinit="dense",
        eval_examples=64,
    )


def main(workdir: str) -> None:
    enable_compilation_cache()
    import jax.numpy as jnp

    from jaxprune import checkpoint, data
    from jaxprune.methods.contract import DatasetData
    from jaxprune.methods.progressive import progressive_prune
    from jaxprune.model import Model

    module, variables, _ = checkpoint.load_model_file(BASE)
    model = Model.linen(module, jnp.zeros((1, 28, 28, 1)), variables=variables)
    dataset = data.load(
        data.DataConfig(train_examples=320, validation_examples=64, test_examples=64)
    )
    # Batches of 8, each delayed: a kill lands between two checkpoints.
    slow = DatasetData(DelayedDataset(dataset, STEP_DELAY_S), batch_size=8)
    result = progressive_prune(model, variables, slow, config(), workdir=workdir, progress=False)
    save_variables(Path(workdir, "final.npz"), result.variables)
    report = {
        "history": without_times(list(result.history)),
        "summary": without_times(result.summary),
        "keep": {k: v.tolist() for k, v in result.keep.items()},
    }
    Path(workdir, "result.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
