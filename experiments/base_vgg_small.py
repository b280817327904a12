"""Base VGG-small on Fashion-MNIST: the CPU preset every pruning experiment starts from.

VGG-small is conv3x3 32-32-M-64-64-M-128-128-M with BN + ReLU, then dense 512 + dropout and the
classifier (29.7 M MACs per 28x28 image).

Command:
    jaxprune train --config experiments/base_vgg_small.py --workdir workdirs/base_vgg_small \
        --export jaxprune/pretrained/vgg_small_fashion_mnist.msgpack

Result on this 2-core CPU: see experiments/results/base_models.md.
"""

from jaxprune.data import DataConfig
from jaxprune.train import OptimizerConfig
from jaxprune.train_job import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="vgg_small",
        data=DataConfig(name="fashion_mnist", batch_size=128, seed=0),
        optimizer=OptimizerConfig(
            name="sgd",
            learning_rate=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            schedule="cosine",
            warmup_epochs=0.2,
        ),
        epochs=3,
        seed=0,
        checkpoint_every_steps=100,
    )
