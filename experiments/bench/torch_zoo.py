"""The PyTorch twins of the zoo models, their train step and inference, and Torch-Pruning.

Imported only where PyTorch is wanted: every function imports ``torch`` itself, so this module
loads without it. `peers` says which of PyTorch and Torch-Pruning can be imported.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np

NUM_CLASSES = 10
# (height, width, channels) of the inputs each model is benchmarked on.
IMAGE_SHAPES = {
    "lenet5": (28, 28, 1),
    "vgg_small": (28, 28, 1),
    "resnet20": (32, 32, 3),
    "resnet56": (32, 32, 3),
}


def peers() -> dict[str, bool]:
    """Which peer libraries are importable: ``{"torch": ..., "torch_pruning": ...}``."""
    return {name: importlib.util.find_spec(name) is not None for name in ("torch", "torch_pruning")}


def setup_torch() -> None:
    """Sets PyTorch up like XLA:CPU: one thread per core, denormal floats flushed to zero.

    XLA:CPU flushes denormals; PyTorch by default computes with them, which made a pruned
    ResNet-56 with random weights (its activations decay through the blocks) run 100x slower.
    """
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)


def torch_model(name: str) -> Any:
    """A PyTorch module built layer for layer like ``jaxprune.models.build_model(name, 10)``.

    Args:
      name: one of `IMAGE_SHAPES`.

    Returns:
      A freshly initialised ``torch.nn.Module`` in the channels_last memory format.
    """
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F  # noqa: N812

    class LeNet5(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(1, 6, 5, padding=2)
            self.conv2 = tnn.Conv2d(6, 16, 5)
            self.fc1, self.fc2 = tnn.Linear(400, 120), tnn.Linear(120, 84)
            self.head = tnn.Linear(84, NUM_CLASSES)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
            return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))

    class VGGSmall(tnn.Module):
        def __init__(self):
            super().__init__()
            layers, width = [], 1
            for stage in ((32, 32), (64, 64), (128, 128)):
                for out in stage:
                    layers += [
                        tnn.Conv2d(width, out, 3, padding=1, bias=False),
                        tnn.BatchNorm2d(out, momentum=0.1, eps=1e-5),
                        tnn.ReLU(),
                    ]
                    width = out
                layers.append(tnn.MaxPool2d(2))
            self.features = tnn.Sequential(*layers)
            self.fc1, self.dropout = tnn.Linear(128 * 3 * 3, 512), tnn.Dropout(0.5)
            self.head = tnn.Linear(512, NUM_CLASSES)

        def forward(self, x):
            x = self.features(x).flatten(1)
            return self.head(self.dropout(F.relu(self.fc1(x))))

    class BasicBlock(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.shortcut = None
            if stride != 1 or cin != cout:  # option B, as in jaxprune.models.resnet
                self.shortcut = tnn.Sequential(
                    tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)

    class ResNet(tnn.Module):
        def __init__(self, blocks_per_stage):
            super().__init__()
            self.stem = tnn.Sequential(
                tnn.Conv2d(3, 16, 3, padding=1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU()
            )
            blocks, width = [], 16
            for stage, out in enumerate((16, 32, 64)):
                for block in range(blocks_per_stage):
                    stride = 2 if stage > 0 and block == 0 else 1
                    blocks.append(BasicBlock(width, out, stride))
                    width = out
            self.blocks = tnn.Sequential(*blocks)
            self.head = tnn.Linear(64, NUM_CLASSES)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    constructors: dict[str, Callable[[], Any]] = {
        "lenet5": LeNet5,
        "vgg_small": VGGSmall,
        "resnet20": lambda: ResNet(3),
        "resnet56": lambda: ResNet(9),
    }
    if name not in constructors:
        raise ValueError(f"no PyTorch twin of {name!r}; choose from {', '.join(constructors)}.")
    torch.manual_seed(0)
    return constructors[name]().to(memory_format=torch.channels_last)


def torch_images(name: str, batch: int, rng: np.random.Generator) -> Any:
    """Random NCHW float32 images for `name`, channels_last in memory (NHWC, like JAX)."""
    import torch

    height, width, channels = IMAGE_SHAPES[name]
    images = torch.as_tensor(rng.normal(size=(batch, channels, height, width)), dtype=torch.float32)
    return images.contiguous(memory_format=torch.channels_last)


def train_step_runner(name: str, batch: int, rng: np.random.Generator) -> Callable[[], None]:
    """One SGD (momentum 0.9) step of softmax cross-entropy on a fixed batch, warmed up."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    model = torch_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch_images(name, batch, rng)
    labels = torch.as_tensor(rng.integers(0, NUM_CLASSES, batch))

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(3):
        step()
    return step


def predictor(model: Any, images: Any) -> Callable[[], None]:
    """Inference of `model` (eval mode, no autograd) on `images`, warmed up."""
    import torch

    def predict():
        model.eval()
        with torch.inference_mode():
            model(images)

    for _ in range(3):
        predict()
    return predict


def prune_half_l1(model: Any, name: str) -> Any:
    """Torch-Pruning's one-shot L1 pruning of 50% of every channel group, logits kept.

    Builds the dependency graph (inside the pruner) and runs one pruning step, in place.

    Returns:
      The pruned `model`.
    """
    import torch
    import torch_pruning as tp

    height, width, channels = IMAGE_SHAPES[name]
    example = torch.zeros(1, channels, height, width)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[model.head],
    )
    pruner.step()
    # The pruned weights are rebuilt in the default (NCHW) layout; without this, every conv of
    # the pruned model converts its channels_last input back and forth, and runs slower than
    # the unpruned one.
    return model.to(memory_format=torch.channels_last)


def macs(model: Any, name: str) -> int:
    """Multiply-accumulates of one image through `model`, as Torch-Pruning counts them."""
    import torch
    import torch_pruning as tp

    height, width, channels = IMAGE_SHAPES[name]
    count, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, channels, height, width))
    return int(count)
