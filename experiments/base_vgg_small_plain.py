"""Base VGG-small without BatchNorm on Fashion-MNIST: the network of the progressive-retraining
experiments' BatchNorm-free control (Osaku et al.'s VGG-16 has no BatchNorm either).

The layout of experiments/base_vgg_small.py without BatchNorm (convolutions with biases, He
initialisation); the learning rate is lower, since no normalisation keeps the activations in
range at 0.05.

Command:
    jaxprune train --config experiments/base_vgg_small_plain.py \\
        --workdir workdirs/base_vgg_small_plain \\
        --export jaxprune/pretrained/vgg_small_plain_fashion_mnist.msgpack

Result on this 2-core CPU: see experiments/results/base_models.md.
"""

from jaxprune.data import DataConfig
from jaxprune.train import OptimizerConfig
from jaxprune.train_job import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="vgg_small_plain",
        data=DataConfig(name="fashion_mnist", batch_size=128, seed=0),
        optimizer=OptimizerConfig(
            name="sgd",
            learning_rate=0.02,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            schedule="cosine",
            warmup_epochs=0.5,
        ),
        epochs=5,
        seed=0,
        checkpoint_every_steps=100,
    )
