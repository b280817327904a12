"""Runs a tiny iterative pruning for tests/test_iterative.py's kill-and-resume test.

Usage: python tests/iterative_run.py WORKDIR

LeNet-5 on 320 Fashion-MNIST training images, 2 channels per step, 4 updates between steps, a
physical shrink every 2 steps, 6 fine-tuning updates at the end. Every training batch is
delayed by `STEP_DELAY_S`, so the test can kill the process (SIGKILL) between checkpoints; the
delay is part of every run, killed or not. The method's run directory is WORKDIR/run; the result
goes to WORKDIR/result.json (history, summary without timings, keep and widths) and
WORKDIR/final.npz (the pruned variables).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kill_resume import save_variables, without_times
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
    )


def main(workdir: str) -> None:
    enable_compilation_cache()
    import jax.numpy as jnp

    import jaxprune as jp
    from jaxprune import checkpoint, data
    from jaxprune.methods.iterative import iterative_prune
    from jaxprune.model import Model

    module, variables, _ = checkpoint.load_model_file(BASE)
    model = Model.linen(module, jnp.zeros((1, 28, 28, 1)), variables=variables)
    dataset = data.load(
        data.DataConfig(train_examples=320, validation_examples=128, test_examples=128)
    )
    result = iterative_prune(
        model,
        variables,
        DelayedDataset(dataset, STEP_DELAY_S),
        config(),
        workdir=str(Path(workdir) / "run"),
        progress=False,
    )
    save_variables(Path(workdir, "final.npz"), result.variables)
    report = {
        "history": without_times(list(result.history)),
        "summary": without_times(result.summary),
        "keep": {name: kept.tolist() for name, kept in result.keep.items()},
        "widths": jp.widths_from_params(result.variables["params"]),
    }
    Path(workdir, "result.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
