"""Paper-scale progressive simplification: VGG-16 with its dense head on CIFAR-10 (32x32).

Osaku, Gomes, Falcao, "Convolutional Neural Network Simplification with Progressive
Retraining" (PRL 2021, arXiv 2101.04699) simplify VGG-16 (13 convs, dense head, no BatchNorm)
on CIFAR-10 one conv layer at a time: p = 5% of the layer's kernels (floored, as their code's
``int(p * n)``) go by the objective criterion (the loss with each kernel removed alone,
"oracle_loss" here), then layers 1..l+1 are retrained for one epoch of the whole training set,
batch 8, SGD with Nesterov momentum 0.9, MSE against layer l+1's output before pruning (in
inference mode: their partial model has no dropout), learning rate 1e-5 for layer 1, 1e-6 for
layers 2-3, 1e-7 for 4-6, 1e-8 after. Their last step re-initialises every dense layer
(Glorot-uniform) and fine-tunes the whole network for 50 epochs at 1e-5, batch 8. This file
holds exactly that configuration (`paper_config`), for a machine with a GPU and CIFAR-10
prepared for TFDS (`tfds build cifar10 --file_format=array_record`, see jaxprune.data).

What differs from the paper: the criterion reads the validation images carved from the training
set (5000; the paper reads the whole training set), and reports its split-half reliability; the
final fine-tuning keeps its last epoch (the authors keep the epoch of lowest training loss) and
shuffles (theirs does not). The complete-retraining ablation is
``dataclasses.replace(paper_config(), retraining="complete")`` (every layer at the authors'
fixed 1e-5).

Command:

    python experiments/progressive_vgg16_cifar10.py --model-file MODEL \\
        --workdir workdirs/progressive_vgg16_cifar10

`MODEL` must hold a zoo "vgg16" (13 convs with bias, dense 4096-4096, 10 classes) trained on
CIFAR-10 at 32x32, written with `jaxprune.checkpoint.save_model_file`. Osaku et al. start from
Keras' ImageNet VGG16. Import the `.h5` weights you have (`jaxprune import-weights
vgg16_weights_tf_dim_ordering_tf_kernels.h5 --out vgg16_imagenet.msgpack`), then train on
CIFAR-10 from its convolutions with new dense layers, since at 32x32 the first dense layer reads
512 inputs instead of 7x7x512: `jaxprune train --set model=vgg16 --set data.name=cifar10
--set init_from=vgg16_imagenet.msgpack --set 'init_fresh=("fc1","fc2","head")' --export
MODEL`. The run checkpoints after
every layer (and during the final fine-tuning) and resumes when run again; it writes
WORKDIR/result.json and prints the test accuracy. `get_config` gives the same run as a job for
``jaxprune prune --config experiments/progressive_vgg16_cifar10.py --workdir WORKDIR`` (which
also reports the base model's accuracy and writes WORKDIR/pruned.msgpack).

It has not been run at full scale here (no GPU, no CIFAR-10): tests/test_progressive_paper.py
runs it for a few updates on `tfds.testing.mock_data` with a narrow VGG-16.
"""

from __future__ import annotations

import argparse
from typing import Any

from jaxprune.data import DataConfig
from jaxprune.methods.progressive import (
    PAPER_COMPLETE_LEARNING_RATE,
    PAPER_LEARNING_RATES,
    ProgressiveConfig,
)

MODEL_FILE = "workdirs/vgg16_cifar10/base.msgpack"
# CIFAR-10 at its native 32x32, no augmentation (the retraining reads plain images).
DATA = DataConfig(name="cifar10", augment=False, batch_size=128)


def paper_config() -> ProgressiveConfig:
    """Osaku et al.'s settings for VGG-16 on CIFAR-10 (their code, oPPR)."""
    return ProgressiveConfig(
        criterion="oracle_loss",
        ratio=0.05,
        rounding="floor",
        score_examples=None,
        score_batch_size=256,
        reliability=True,
        retraining="progressive",
        loss="mse",
        batch_norm="frozen",
        learning_rates=PAPER_LEARNING_RATES,
        complete_learning_rate=PAPER_COMPLETE_LEARNING_RATE,
        momentum=0.9,
        nesterov=True,
        batch_size=8,
        retrain_epochs=1,
        retrain_examples=None,
        final_finetune_epochs=50,
        final_learning_rate=1e-5,
        final_batch_size=8,
        final_reinit="dense",
        eval_examples=5000,
    )


def get_config() -> Any:
    """The run as a `jaxprune prune --config` job."""
    from jaxprune.commands.prune import PruneJob

    return PruneJob(
        method="progressive",
        # A zoo "vgg16" trained on CIFAR-10 at 32x32 (pass --variables to use another file).
        model="vgg16",
        variables=MODEL_FILE,
        data=DATA,
        progressive=paper_config(),
    )


def run(
    model_file: str,
    workdir: str | None,
    config: ProgressiveConfig | None = None,
    data_config: DataConfig = DATA,
    progress: bool = True,
) -> dict[str, Any]:
    """Loads the base model and CIFAR-10, simplifies, and measures the test accuracy.

    Args:
      model_file: the trained base model.
      workdir: the run's workdir (resumes there); None: in memory only.
      config: the settings (default `paper_config()`).
      data_config: the data (default CIFAR-10 at 32x32, no augmentation).
      progress: progress bars.

    Returns:
      ``{"result": PruneResult, "test": {"loss", "accuracy", "kappa", "count"}}``.
    """
    import jax.numpy as jnp

    from jaxprune import checkpoint, data, train
    from jaxprune.methods.contract import DatasetData
    from jaxprune.methods.progressive import progressive_prune
    from jaxprune.model import Model

    module, variables, _ = checkpoint.load_model_file(model_file)
    dataset = data.load(data_config)
    model = Model.linen(module, jnp.zeros((1, *dataset.image_shape)), variables=variables)
    result = progressive_prune(
        model,
        variables,
        DatasetData(dataset, batch_size=data_config.batch_size),
        config or paper_config(),
        workdir=workdir,
        progress=progress,
    )
    test = train.evaluate(
        result.model,
        result.variables,
        data.preprocessed_batches(dataset, "test", data_config.batch_size),
    )
    return {"result": result, "test": test}


def main() -> None:
    from jaxprune.runtime import enable_compilation_cache

    enable_compilation_cache()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-file", default=MODEL_FILE)
    parser.add_argument("--workdir", default="workdirs/progressive_vgg16_cifar10")
    args = parser.parse_args()
    outcome = run(args.model_file, args.workdir)
    print(f"test accuracy {100 * outcome['test']['accuracy']:.2f}%", flush=True)


if __name__ == "__main__":
    main()
