"""Paper-scale criteria blending (He et al. 2021): ResNet-56 on CIFAR-100, for GPU users.

He, Huang, Liang, Liang, Yang, "Blending Pruning Criteria for Convolutional Neural Networks",
ICANN 2021 (arXiv 2107.05033) evaluate their blend on CIFAR ResNets; this config runs our
implementation at the scale they describe: the 12-criterion pool, a population of 32 over 20
generations, fitness on 1000 held-out validation images, then fine-tuning.

Command, on a machine with CIFAR-100 prepared for TFDS (`tfds build cifar100
--file_format=array_record`) and a trained ResNet-56 written with
`jaxprune.checkpoint.save_model_file` (e.g. `jaxprune train ... --export`):

    jaxprune prune --config experiments/blending_resnet56_cifar100.py \\
        --variables workdirs/r56_c100/base.msgpack --workdir workdirs/blending_r56_c100

Every generation and the fine-tuning are checkpointed in the workdir and the run resumes when
started again. It has not been run at this scale here (no GPU, no CIFAR-100):
tests/test_blending.py runs this config's `blending` settings through
`jaxprune.methods.blending.blending_prune` for two generations of four candidates on TFDS mock
data with a 4-channel ResNet-56.
"""

from __future__ import annotations

from jaxprune.commands.prune import PruneJob
from jaxprune.data import DataConfig
from jaxprune.fit import FitConfig
from jaxprune.methods.blending import BlendingConfig
from jaxprune.methods.blending_clusters import ClusterConfig
from jaxprune.methods.evolution import EvolutionConfig


def get_config() -> PruneJob:
    """The paper-scale settings."""
    return PruneJob(
        method="blending",
        # A zoo "resnet56" trained on CIFAR-100 (pass --variables to use another file).
        model="resnet56",
        variables="workdirs/r56_c100/base.msgpack",
        # CIFAR-100: 5000 training images carved out as the validation split (fitness, criteria).
        data=DataConfig(name="cifar100", batch_size=128, validation_size=5000),
        blending=BlendingConfig(
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
            # 40 epochs of SGD (momentum 0.9, weight decay 5e-4, cosine from 0.01).
            finetune=FitConfig(epochs=40),
        ),
    )
