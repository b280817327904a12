"""Base LeNet-5 on Fashion-MNIST: the starting point of the LeNet pruning experiments.

Command:
    jaxprune train --config experiments/base_lenet5.py --workdir workdirs/base_lenet5 \
        --export jaxprune/pretrained/lenet5_fashion_mnist.msgpack

Result on this 2-core CPU: see experiments/results/base_models.md.
"""

from jaxprune.data import DataConfig
from jaxprune.train import OptimizerConfig
from jaxprune.train_job import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="lenet5",
        data=DataConfig(name="fashion_mnist", batch_size=128, seed=0),
        # Adam at 2e-3 with a cosine decay: LeNet has no BN, and plain SGD needs more epochs.
        optimizer=OptimizerConfig(name="adam", learning_rate=2e-3, schedule="cosine"),
        epochs=15,
        seed=0,
    )
