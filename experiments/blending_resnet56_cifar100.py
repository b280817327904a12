"""Paper-scale criteria blending (He et al. 2021): ResNet-56 on CIFAR-100, for GPU users.

He, Huang, Liang, Liang, Yang, "Blending Pruning Criteria for Convolutional Neural Networks",
ICANN 2021 (arXiv 2107.05033) evaluate their blend on CIFAR ResNets; this config runs our
implementation at the scale they describe: the 12-criterion pool, a population of 32 over 20
generations, fitness on 1000 held-out validation images, then fine-tuning.

Command, on a machine with CIFAR-100 prepared for TFDS (`tfds build cifar100
--file_format=array_record`) and a trained ResNet-56 written with
`jaxprune.checkpoint.save_model_file` (e.g. `jaxprune train ... --export`):

    python experiments/blending_resnet56_cifar100.py --model-file workdirs/r56_c100/base.msgpack \\
        --workdir workdirs/blending_r56_c100

Every generation is checkpointed in the workdir and the run resumes when started again. It has
not been run at this scale here (no GPU, no CIFAR-100): tests/test_blending.py runs this config
for two generations of four candidates on TFDS mock data with a 4-channel ResNet-56.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from jaxprune.data import DataConfig
from jaxprune.methods.blending import BlendingConfig
from jaxprune.methods.blending_clusters import ClusterConfig
from jaxprune.methods.evolution import EvolutionConfig

# CIFAR-100: 5000 training images carved out as the validation split (fitness and criteria).
DATA = DataConfig(name="cifar100", batch_size=128, validation_size=5000)


def get_config() -> BlendingConfig:
    """The paper-scale settings."""
    return BlendingConfig(
        criterion="all",
        ratio=0.4,
        ranking="per_layer",
        clustering=ClusterConfig(similarity="spearman", threshold=0.7),
        evolution=EvolutionConfig(population=32, generations=20),
        fitness="accuracy",
        score_examples=1024,
        fitness_examples=1000,
        batch_size=250,
        chunk_size=32,
        finetune_epochs=40,
        finetune_lr=0.01,
    )


def main(argv: list[str] | None = None) -> dict:
    """Runs the config on a model file; returns the report (also written to result.json)."""
    from jaxprune import checkpoint, data
    from jaxprune.commands import reporting, run_blending
    from jaxprune.runtime import enable_compilation_cache

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-file", required=True, help="a trained zoo ResNet-56 model file")
    parser.add_argument("--workdir", default="workdirs/blending_r56_c100")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory")
    parser.add_argument("--generations", type=int, default=None, help="override the search length")
    parser.add_argument("--population", type=int, default=None, help="override the population")
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    config = get_config()
    evolution = config.evolution
    if args.generations is not None:
        evolution = dataclasses.replace(evolution, generations=args.generations)
    if args.population is not None:
        evolution = dataclasses.replace(evolution, population=args.population)
    config = dataclasses.replace(config, evolution=evolution)
    if args.finetune_epochs is not None:
        config = dataclasses.replace(config, finetune_epochs=args.finetune_epochs)
    model, variables, _ = checkpoint.load_model_file(args.model_file)
    dataset = data.load(dataclasses.replace(DATA, data_dir=args.data_dir))
    workdir = Path(args.workdir)
    report = run_blending.run(
        config, "resnet56", model, variables, dataset, workdir, progress=not args.no_progress
    )
    (workdir / "result.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), **report}, indent=1,
                   default=reporting.json_default)
    )  # fmt: skip
    return report


if __name__ == "__main__":
    main()
