"""Paper-scale iterative pruning: VGG-16 fine-tuned on Birds-200 (CUB-200-2011), Taylor criterion.

Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient Inference",
ICLR 2017 (arXiv 1611.06440), prune a VGG-16 adapted to Birds-200 one feature map at a time,
with 30 mini-batch updates (batch 32, learning rate 1e-4, weight decay 1e-4, SGD with momentum
0.9) between pruning steps. Reference number from the paper: the fine-tuned, unpruned VGG-16
reaches 72.2% test accuracy on Birds-200 (the starting point of its pruning curves).

Command, on a machine with a GPU and CUB-200-2011 prepared for TFDS (`tfds build
caltech_birds2011 --file_format=array_record`, see jaxprune.data):

    jaxprune prune --config experiments/iterative_vgg16_birds.py --workdir workdirs/vgg16_birds

`variables` must hold a VGG-16 (the zoo's "vgg16": 13 convs, dense 4096-4096, 200 classes)
already fine-tuned on Birds-200, written with `jaxprune.checkpoint.save_model_file`. From the
ImageNet VGG-16 weights you have (nothing is downloaded):

    jaxprune import-weights vgg16.safetensors --out workdirs/vgg16_imagenet.msgpack
    jaxprune train --workdir workdirs/vgg16_birds_finetune \
        --export workdirs/vgg16_birds/base.msgpack \
        --set model=vgg16 --set data.name=caltech_birds2011 --set data.image_size=224 \
        --set init_from=workdirs/vgg16_imagenet.msgpack --set 'init_fresh=("head",)'

(the head gets 200 new outputs, every other layer starts from ImageNet; the paper's fine-tuning
schedule is not stated, so choose the epochs and learning rate on validation). The input
normalisation must match the weights' (torchvision: ImageNet mean/std; see
`jaxprune.models.imported`). The run checkpoints every 10 pruning steps and resumes when run
again (`--variables FILE` names another model file). From Python, with `job = get_config()`:

    jaxprune.commands.prune.run_job(job, "workdirs/vgg16_birds")

It has not been run here (no GPU, no Birds-200 data): only a few steps on TFDS mock data at
32x32 with narrow widths run in tests/test_iterative.py.
"""

from jaxprune.commands.prune import PruneJob
from jaxprune.data import DataConfig
from jaxprune.methods.iterative import IterativeConfig
from jaxprune.train import OptimizerConfig


def get_config() -> PruneJob:
    return PruneJob(
        method="iterative",
        model="vgg16",
        variables="workdirs/vgg16_birds/base.msgpack",
        data=DataConfig(name="caltech_birds2011", image_size=224, batch_size=32),
        iterative=IterativeConfig(
            criterion="taylor",
            updates_per_step=30,
            channels_per_step=1,
            batch_size=32,
            optimizer=OptimizerConfig(
                name="sgd",
                learning_rate=1e-4,
                momentum=0.9,
                weight_decay=1e-4,
                schedule="constant",
            ),
            normalization="l2",
            scope="conv",
            target_flops=0.3,
            shrink_every=100,
            eval_every=10,
            checkpoint_every=10,
        ),
    )
