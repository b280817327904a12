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

    jaxprune prune --config experiments/progressive_vgg16_cifar10.py --model-file MODEL \\
        --workdir workdirs/progressive_vgg16_cifar10

`MODEL` must hold a zoo "vgg16" (13 convs with bias, dense 4096-4096, 10 classes) trained on
CIFAR-10 at 32x32, written with `jaxprune.checkpoint.save_model_file`. The run checkpoints after
every layer and resumes when run again; it writes WORKDIR/pruned.msgpack and result.json.

It has not been run at full scale here (no GPU, no CIFAR-10): tests/test_progressive_paper.py
runs it for a few updates on `tfds.testing.mock_data` with a narrow VGG-16.
"""

from __future__ import annotations

from jaxprune.commands.prune import PruneJob
from jaxprune.data import DataConfig
from jaxprune.methods.progressive import PAPER_LEARNING_RATES, ProgressiveConfig


def get_config() -> PruneJob:
    """Osaku et al.'s settings for VGG-16 on CIFAR-10."""
    return PruneJob(
        method="progressive",
        # A zoo "vgg16" trained on CIFAR-10 at 32x32 (pass --model-file to use another path).
        model="vgg16",
        model_file="workdirs/vgg16_cifar10/base.msgpack",
        # CIFAR-10 at its native 32x32, no augmentation (the retraining reads plain images).
        data=DataConfig(name="cifar10", augment=False, batch_size=8),
        progressive=ProgressiveConfig(
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
        ),
    )
