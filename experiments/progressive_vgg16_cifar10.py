"""Paper-scale progressive simplification: VGG-16 with its dense head on CIFAR-10 (32x32).

Osaku, Gomes, Falcao, "Convolutional Neural Network Simplification with Progressive
Retraining" (PRL 2021, arXiv 2101.04699) simplify VGG-16 (13 convs, dense head) on CIFAR-10 one
conv layer at a time: p = 5% of the layer's kernels go by the objective criterion (the loss
with each kernel removed alone, "oracle_loss" here), then layers 1..l+1 are retrained for one
epoch of the whole training set, batch 8, SGD with Nesterov momentum 0.9, MSE against layer
l+1's output before pruning, learning rate 1e-5 for layer 1, 1e-6 for layers 2-3, 1e-7 for
4-6, 1e-8 after. This file holds exactly that configuration, for a machine with a GPU and
CIFAR-10 prepared for TFDS (`tfds build cifar10 --file_format=array_record`, see
jaxprune.data).

Command:

    python experiments/progressive_vgg16_cifar10.py --model-file MODEL --workdir workdirs/p16

`MODEL` must hold a zoo "vgg16" (13 convs with bias, dense 4096-4096, 10 classes) trained on
CIFAR-10 at 32x32, written with `jaxprune.checkpoint.save_model_file`. The run checkpoints after
every layer and resumes when run again; it writes WORKDIR/pruned.msgpack and result.json.

It has not been run at full scale here (no GPU, no CIFAR-10): tests/test_progressive_paper.py
runs it for a few updates on `tfds.testing.mock_data` with a narrow VGG-16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxprune.data import DataConfig
from jaxprune.methods.progressive import PAPER_LEARNING_RATES, ProgressiveConfig


@dataclasses.dataclass(frozen=True)
class PaperJob:
    """The model, the data and the method's settings of the paper-scale run."""

    # Zoo model name and the trained model file.
    model: str = "vgg16"
    model_file: str = "workdirs/vgg16_cifar10/base.msgpack"
    # CIFAR-10 at its native 32x32, no augmentation (the retraining reads plain images).
    data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(name="cifar10", augment=False, batch_size=8)
    )
    # Osaku et al.'s settings.
    progressive: ProgressiveConfig = dataclasses.field(
        default_factory=lambda: ProgressiveConfig(
            criterion="oracle_loss",
            ratio=0.05,
            score_examples=50000,
            score_batch_size=256,
            retraining="progressive",
            loss="mse",
            learning_rates=PAPER_LEARNING_RATES,
            momentum=0.9,
            nesterov=True,
            batch_size=8,
            retrain_epochs=1,
            retrain_examples=None,
            eval_examples=10000,
            progress=True,
        )
    )


def get_config() -> PaperJob:
    return PaperJob()


def run(job: PaperJob, workdir: str | Path) -> dict[str, Any]:
    """Runs the job; writes WORKDIR/pruned.msgpack and WORKDIR/result.json."""
    from jaxprune import checkpoint, data
    from jaxprune.commands import reporting, run_progressive

    workdir = Path(workdir)
    model, variables, _ = checkpoint.load_model_file(job.model_file)
    dataset = data.load(job.data)
    report = run_progressive.run(
        job.progressive,
        job.model,
        model,
        variables,
        dataset,
        workdir,
        progress=job.progressive.progress,
    )
    report = {"job": json.loads(json.dumps(dataclasses.asdict(job))), **report}
    (workdir / "result.json").write_text(
        json.dumps(report, indent=1, default=reporting.json_default)
    )
    return report


def main() -> None:
    from jaxprune.runtime import enable_compilation_cache

    enable_compilation_cache()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-file", default=PaperJob.model_file)
    parser.add_argument("--workdir", default="workdirs/progressive_vgg16_cifar10")
    args = parser.parse_args()
    job = dataclasses.replace(get_config(), model_file=args.model_file)
    report = run(job, args.workdir)
    print(json.dumps(report["summary"], indent=1, default=str))


if __name__ == "__main__":
    main()
