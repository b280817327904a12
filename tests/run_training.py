"""Runs a short Fashion-MNIST training for tests/test_checkpoint.py's kill-and-resume test.

Usage: python tests/run_training.py WORKDIR

Every training batch is delayed by `STEP_DELAY_S`, so that the test can kill the process
(SIGKILL) between two checkpoints. The delay is part of the command, so the killed run, the
resumed run and the uninterrupted run all run exactly the same thing. The final metrics go to
WORKDIR/result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slow_data import DelayedDataset

from jaxprune.runtime import enable_compilation_cache

STEP_DELAY_S = 0.04

CONFIG = dict(
    model="lenet5",
    data=dict(batch_size=32, train_examples=640, validation_examples=128, test_examples=128),
    optimizer=dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    epochs=3,
    checkpoint_every_steps=8,
    keep_checkpoints=2,
    log_every_steps=4,
    eval_batch_size=64,
    progress=False,
)


def main(workdir: str) -> None:
    enable_compilation_cache()
    from jaxprune import data, train_job

    config = train_job.TrainConfig.from_dict(CONFIG)
    dataset = DelayedDataset(data.load(config.data), STEP_DELAY_S)
    result = train_job.train_and_evaluate(config, workdir, dataset=dataset)
    Path(workdir, "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
