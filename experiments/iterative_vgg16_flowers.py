"""Paper-scale iterative pruning: VGG-16 fine-tuned on Flowers-102, Taylor criterion.

Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient Inference",
ICLR 2017 (arXiv 1611.06440), prune networks adapted to Flowers-102 one feature map at a time,
with 10 mini-batch updates (batch 32, learning rate 1e-4, weight decay 1e-4, SGD with momentum
0.9) between pruning steps. Reference number from the paper: the fine-tuned, unpruned AlexNet
reaches 80.1% test accuracy on Flowers-102. The paper's Flowers-102 experiment uses AlexNet;
this config runs the same procedure on the zoo's VGG-16, so 80.1% is the paper's AlexNet
baseline, not a VGG-16 number to match.

Command, on a machine with a GPU and Flowers-102 prepared for TFDS (`tfds build
oxford_flowers102 --file_format=array_record`, see jaxprune.data):

    jaxprune prune --config experiments/iterative_vgg16_flowers.py --workdir workdirs/vgg16_flowers

`variables` must hold a VGG-16 (the zoo's "vgg16", 102 classes) fine-tuned on Flowers-102,
written with `jaxprune.checkpoint.save_model_file`: import ImageNet weights you have with
`jaxprune import-weights`, then fine-tune with a new head as experiments/iterative_vgg16_birds.py
shows (`--set init_from=... --set 'init_fresh=("head",)'`). Flowers-102 has its own validation split
(1020 images), which every pruning decision reads. It has not been run here (no GPU, no
Flowers-102 data): only a few steps on TFDS mock data run in tests/test_iterative.py.
"""

import dataclasses
from pathlib import Path

from jaxprune.cli import load_config
from jaxprune.commands.prune import PruneJob
from jaxprune.data import DataConfig


def get_config() -> PruneJob:
    # The Birds-200 setting of experiments/iterative_vgg16_birds.py with the paper's Flowers-102
    # changes: its data and 10 updates (not 30) between pruning steps.
    birds = load_config(Path(__file__).with_name("iterative_vgg16_birds.py"))
    return dataclasses.replace(
        birds,
        variables="workdirs/vgg16_flowers/base.msgpack",
        data=DataConfig(name="oxford_flowers102", image_size=224, batch_size=32),
        iterative=dataclasses.replace(birds.iterative, updates_per_step=10),
    )
