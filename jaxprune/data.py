"""Input pipelines: TFDS datasets by random access, deterministic batching, jitted preprocessing.

Every dataset is a TFDS dataset stored as ``array_record`` files and read back with
``tfds.data_source`` (random access, no TensorFlow). Fashion-MNIST is built offline by this
module from the idx files of the Debian package ``dataset-fashion-mnist``; the other datasets
(CIFAR-10/100, Oxford Flowers-102, CUB-200-2011, Imagenette) are read once someone has prepared
them with ``tfds build`` on a machine with internet and copied the data dir here.

Splits. Every dataset exposes ``"train"``, ``"validation"`` and ``"test"``. The validation split is
carved from the training split with a fixed seed (5000 examples for Fashion-MNIST and CIFAR)
unless the dataset has its own validation split. Everything that makes a pruning decision —
criteria, the oracle ranking, evolutionary fitness, the kernel-selection page — reads the
validation split. The test split is only for reporting final accuracy; nothing tunes on it.

Determinism. The order of an epoch is a function of ``(seed, epoch)`` alone, so a run resumed at
``(epoch, batch_index)`` sees exactly the batches an uninterrupted run sees. Augmentation keys come
from ``augmentation_key(seed, epoch, batch_index)`` for the same reason.

Example::

  dataset = load(DataConfig(name="fashion_mnist", batch_size=128))
  for step, batch in enumerate(dataset.iterate("train", epoch=0)):
    key = augmentation_key(dataset.config.seed, 0, step)
    images, labels = dataset.preprocess(batch["image"], batch["label"], key, train=True)
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from jaxprune import sharding
from jaxprune.runtime import DEFAULT_CACHE_DIR

Batch = dict[str, np.ndarray]

DATA_DIR_ENV = "JAXPRUNE_DATA_DIR"
FASHION_MNIST_DIR_ENV = "JAXPRUNE_FASHION_MNIST_DIR"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_NAMES = ("train", "validation", "test")

# Datasets whose size (after any host-side resize) fits under this are held as NumPy arrays.
IN_MEMORY_LIMIT_BYTES = 1 << 30
# Large images are resized on the host to image_size * 8/7 (the usual 256 for 224), so that
# training can take random crops of image_size and evaluation a centre crop.
RESIZE_MARGIN = 8 / 7

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_HELP = (
    "Fashion-MNIST is read from the four *-idx?-ubyte.gz files of the Debian package "
    "dataset-fashion-mnist. Install it with `apt-get install -y dataset-fashion-mnist`, or set "
    f"{FASHION_MNIST_DIR_ENV} (DataConfig.source_dir) to a folder holding "
    + ", ".join(name for pair in _FASHION_MNIST_FILES.values() for name in pair)
    + "."
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingDatasetError(FileNotFoundError):
    """A dataset is neither prepared in the data dir nor buildable from local files."""


# --------------------------------------------------------------------------------------------
# Dataset table and configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is stored in TFDS and how it is fed to a model."""

    tfds_name: str  # registered TFDS builder name
    train_split: str = "train"  # TFDS split we train on; validation may be carved from it
    test_split: str = "test"  # TFDS split reported as our "test"
    validation_split: str | None = None  # the dataset's own validation split, if it has one
    default_validation_size: int = 5000  # examples carved from train when there is no own split
    image_key: str = "image"  # feature names in the TFDS examples
    label_key: str = "label"
    mean: tuple[float, ...] = IMAGENET_MEAN  # per channel, on images scaled to [0, 1]
    std: tuple[float, ...] = IMAGENET_STD
    augment_by_default: bool = True
    crop_padding: int = 4  # zero padding of the random crop of fixed-size images
    default_image_size: int | None = None  # output size of variable-size images (None: native)
    builds_locally: bool = False  # prepared by this module from local files
    # What a model for this dataset takes and predicts, known before any data is read (so a
    # command can check its model and settings first): (H, W, C) after preprocessing.
    image_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        # Our own builder: tfds already registers "fashion_mnist" (which downloads).
        "fashion_mnist": DatasetSpec(
            image_shape=(28, 28, 1),
            num_classes=10,
            tfds_name="jaxprune_fashion_mnist",
            mean=(0.2860,),
            std=(0.3530,),
            augment_by_default=False,
            crop_padding=2,
            builds_locally=True,
        ),
        "cifar10": DatasetSpec(
            image_shape=(32, 32, 3),
            num_classes=10,
            tfds_name="cifar10",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
        ),
        "cifar100": DatasetSpec(
            image_shape=(32, 32, 3),
            num_classes=100,
            tfds_name="cifar100",
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
        ),
        "oxford_flowers102": DatasetSpec(
            image_shape=(224, 224, 3),
            num_classes=102,
            tfds_name="oxford_flowers102",
            validation_split="validation",
            default_validation_size=1020,
            default_image_size=224,
        ),
        "caltech_birds2011": DatasetSpec(
            image_shape=(224, 224, 3),
            num_classes=200,
            tfds_name="caltech_birds2011",
            default_validation_size=600,
            default_image_size=224,
        ),
        # Imagenette publishes train and validation only; its validation split is the held-out
        # set everyone reports, so it is our test split and validation is carved from train.
        "imagenette": DatasetSpec(
            image_shape=(224, 224, 3),
            num_classes=10,
            tfds_name="imagenette",
            test_split="validation",
            default_validation_size=1000,
            default_image_size=224,
        ),
    }
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to load and how to batch it."""

    name: str = "fashion_mnist"  # a key of DATASETS
    data_dir: str | None = None  # prepared TFDS data; None: $JAXPRUNE_DATA_DIR or ~/.cache/...
    source_dir: str | None = None  # Fashion-MNIST idx files; None: $JAXPRUNE_FASHION_MNIST_DIR
    batch_size: int = 128  # default batch size of Dataset.iterate
    seed: int = 0  # shuffling (and the augmentation keys of a training loop)
    validation_size: int | None = None  # carve this many from train; None: dataset default
    validation_seed: int = 0  # fixes which examples are carved and which form subsets
    augment: bool | None = None  # random crop + flip on train batches; None: dataset default
    image_size: int | None = None  # output side length; None: native, or 224 for large images
    train_examples: int | None = None  # keep a fixed subset of this many examples (quick runs)
    validation_examples: int | None = None
    test_examples: int | None = None
    in_memory: bool | None = None  # hold splits as arrays; None: when under 1 GiB


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Returns the folder of prepared TFDS datasets.

    Args:
      data_dir: explicit folder; else `$JAXPRUNE_DATA_DIR`; else
        `~/.cache/jaxprune/tensorflow_datasets`.

    Returns:
      The folder (not created).
    """
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else DEFAULT_CACHE_DIR / "tensorflow_datasets"


def resolve_fashion_mnist_dir(source_dir: str | os.PathLike | None = None) -> Path:
    """Returns the folder holding the Fashion-MNIST idx files.

    Args:
      source_dir: explicit folder; else `$JAXPRUNE_FASHION_MNIST_DIR`; else the Debian package's
        `/usr/share/datasets/fashion-mnist`.

    Returns:
      The folder (not checked).
    """
    chosen = source_dir or os.environ.get(FASHION_MNIST_DIR_ENV)
    return Path(chosen).expanduser() if chosen else DEFAULT_FASHION_MNIST_DIR


def dataset_spec(name: str) -> DatasetSpec:
    """Returns the table entry of a dataset, or raises a ValueError naming the known ones."""
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}. "
            "Pass a DatasetSpec to load(config, spec=...) to read another prepared TFDS dataset."
        )
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# Fashion-MNIST from the Debian idx files
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads a gzipped idx file of unsigned bytes (the MNIST format) into an array.

    Args:
      path: a `*-idx?-ubyte.gz` file.

    Returns:
      uint8 array with the shape recorded in the file's header.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is too short to be an idx file.")
    zeros, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zeros != 0 or type_code != 0x08:
        raise ValueError(
            f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()}, "
            "expected 0000 08 0N); re-install dataset-fashion-mnist."
        )
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if len(data) - header_size != math.prod(shape):
        raise ValueError(
            f"{path} holds {len(data) - header_size} bytes of data, but its header says "
            f"{shape}; the file is truncated or corrupt, re-install dataset-fashion-mnist."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _check_fashion_mnist_files(source_dir: Path) -> None:
    missing = [
        name
        for pair in _FASHION_MNIST_FILES.values()
        for name in pair
        if not (source_dir / name).is_file()
    ]
    if missing:
        raise MissingDatasetError(
            f"Fashion-MNIST is not prepared and {source_dir} lacks {', '.join(missing)}. "
            + _FASHION_MNIST_HELP
        )


class JaxpruneFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST built offline from local idx files (the Debian package's by default).

    Images are stored as raw uint8 tensors: encoding PNG would need TensorFlow, and raw bytes
    decode faster. The idx folder is TFDS's manual dir.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw uint8 images read from the local idx files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _FASHION_MNIST_HELP

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST: 28x28 grayscale images of 10 kinds of clothing.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=FASHION_MNIST_LABELS),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        source_dir = Path(dl_manager.manual_dir)
        return {
            split: self._generate_examples(source_dir / images, source_dir / labels)
            for split, (images, labels) in _FASHION_MNIST_FILES.items()
        }

    def _generate_examples(
        self, images_path: Path, labels_path: Path
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{images_path} {images.shape} and {labels_path} {labels.shape} are not "
                "N 28x28 images with N labels; re-install dataset-fashion-mnist."
            )
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": image[..., None], "label": int(label)}


def prepare(
    name: str = "fashion_mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Makes sure a dataset is prepared in the data dir, building Fashion-MNIST if needed.

    Building happens once; later calls only check. Datasets other than Fashion-MNIST cannot be
    built offline: for them this checks that they are prepared and explains how to get them.

    Args:
      name: a key of `DATASETS`.
      data_dir: folder of prepared TFDS datasets (see `resolve_data_dir`).
      source_dir: folder of the Fashion-MNIST idx files (see `resolve_fashion_mnist_dir`).

    Returns:
      The folder of the prepared dataset version.

    Raises:
      MissingDatasetError: the dataset is not prepared and cannot be built here.
    """
    spec = dataset_spec(name)
    data_dir = resolve_data_dir(data_dir)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return Path(builder.data_dir)
    if not spec.builds_locally:
        raise MissingDatasetError(_how_to_get(name, spec, data_dir))
    source_dir = resolve_fashion_mnist_dir(source_dir)
    _check_fashion_mnist_files(source_dir)
    builder.download_and_prepare(
        # Nothing to download; without this TFDS would first look for the dataset on GCS.
        download_config=tfds.download.DownloadConfig(manual_dir=source_dir, try_download_gcs=False)
    )
    return Path(builder.data_dir)


def _how_to_get(name: str, spec: DatasetSpec, data_dir: Path) -> str:
    return (
        f"Dataset {name!r} (TFDS {spec.tfds_name!r}) is not prepared in {data_dir}. jaxprune "
        "reads TFDS datasets offline, in the array_record format. On a machine with internet "
        f"and TensorFlow (pip install 'jaxprune[tf]'), run `tfds build {spec.tfds_name} "
        "--data_dir=DIR --file_format=array_record` (or `python -m "
        f"tensorflow_datasets.scripts.download_and_prepare {spec.tfds_name} --data_dir=DIR "
        f"--file_format=array_record`), then copy DIR/{spec.tfds_name} into {data_dir}, or "
        f"point {DATA_DIR_ENV} / DataConfig.data_dir at DIR."
    )


def _open_source(name: str, spec: DatasetSpec, split: str, data_dir: Path) -> Sequence[Any]:
    """Opens one TFDS split for random access, turning TFDS's errors into actionable ones."""
    try:
        source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, ValueError, KeyError, OSError) as err:
        # Checked only on failure: under tfds.testing.mock_data nothing is ever "prepared".
        if not tfds.builder(spec.tfds_name, data_dir=data_dir).is_prepared():
            raise MissingDatasetError(_how_to_get(name, spec, data_dir)) from err
        if isinstance(err, NotImplementedError):
            raise ValueError(
                f"{spec.tfds_name} in {data_dir} was prepared in a format without random access. "
                f"Rebuild it with `tfds build {spec.tfds_name} --file_format=array_record`, or "
                f"convert it with `tfds convert_format --dataset_dir=DATASET_VERSION_DIR "
                "--out_file_format=array_record`."
            ) from err
        raise
    if len(source) == 0:
        raise ValueError(f"Split {split!r} of {spec.tfds_name} in {data_dir} is empty.")
    return source


# --------------------------------------------------------------------------------------------
# Which records form which split
# --------------------------------------------------------------------------------------------


def carve_validation(
    num_examples: int, validation_size: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits record indices 0..num_examples-1 into train and a held-out validation set.

    Args:
      num_examples: size of the split to carve from.
      validation_size: how many records go to validation.
      seed: fixes the choice; the same seed always carves the same records.

    Returns:
      (train_indices, validation_indices), both sorted int64, disjoint, covering everything.
    """
    if not 0 < validation_size < num_examples:
        raise ValueError(
            f"validation_size={validation_size} must be between 1 and {num_examples - 1} for a "
            f"training split of {num_examples} examples; change DataConfig.validation_size."
        )
    order = np.random.default_rng(_seed_sequence(seed, 0)).permutation(num_examples)
    return np.sort(order[validation_size:]), np.sort(order[:validation_size])


def fixed_subset(indices: np.ndarray, size: int, *, seed: int) -> np.ndarray:
    """Picks a fixed random subset of `size` of the given record indices.

    Args:
      indices: record indices of a split.
      size: how many to keep.
      seed: fixes the choice.

    Returns:
      Sorted subset of `indices`.
    """
    if not 0 < size <= len(indices):
        raise ValueError(
            f"A subset of {size} examples is impossible from a split of {len(indices)}; set "
            "DataConfig.train_examples / validation_examples / test_examples within that range."
        )
    chosen = np.random.default_rng(_seed_sequence(seed, 1)).permutation(len(indices))[:size]
    return np.sort(np.asarray(indices)[chosen])


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """Returns the order in which an epoch visits a split: a function of (seed, epoch) only.

    Args:
      num_examples: size of the split.
      seed: run seed.
      epoch: epoch number, from 0.

    Returns:
      A permutation of 0..num_examples-1 (int64).
    """
    return np.random.default_rng(_seed_sequence(seed, 2, epoch)).permutation(num_examples)


def augmentation_key(seed: int, epoch: int, batch_index: int) -> jax.Array:
    """Returns the augmentation key of one batch: a function of (seed, epoch, batch_index) only.

    Args:
      seed: run seed.
      epoch: epoch number.
      batch_index: batch number within the epoch.

    Returns:
      A JAX PRNG key for `preprocess(..., train=True)`.
    """
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return jax.random.fold_in(key, batch_index)


def _seed_sequence(seed: int, stream: int, *more: int) -> np.random.SeedSequence:
    # Distinct streams keep the carve, the subsets and the epoch orders independent.
    values = (seed, stream, *more)
    if any(int(v) < 0 for v in values):
        raise ValueError(f"Seeds and epochs must be non-negative integers, got {values}.")
    return np.random.SeedSequence([int(v) for v in values])


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    image_key: str
    label_key: str
    host_size: int | None  # resize variable-size images to this square on the host


class _Reader(Protocol):
    def __call__(self, positions: np.ndarray) -> Batch: ...


@dataclasses.dataclass(frozen=True, eq=False)
class _ArrayReader:
    """A split held in memory."""

    images: np.ndarray
    labels: np.ndarray

    def __call__(self, positions: np.ndarray) -> Batch:
        return {"image": self.images[positions], "label": self.labels[positions]}


@dataclasses.dataclass(frozen=True, eq=False)
class _SourceReader:
    """A split read from the data source batch by batch (datasets too big for memory)."""

    source: Sequence[Any]
    record_indices: np.ndarray
    layout: _Layout

    def __call__(self, positions: np.ndarray) -> Batch:
        return _read(self.source, self.record_indices[positions], self.layout)


def _read(source: Sequence[Any], record_indices: np.ndarray, layout: _Layout) -> Batch:
    keys = [int(i) for i in record_indices]
    try:
        examples = source.__getitems__(keys)  # one batched read: ~4x faster than item by item
    except TypeError:
        # tfds.testing.mock_data's source cannot bind __getitems__; it serves items one by one.
        examples = [source[k] for k in keys]
    images = [np.asarray(example[layout.image_key]) for example in examples]
    if layout.host_size is not None:
        images = [_fit_square(image, layout.host_size) for image in images]
    labels = np.asarray([example[layout.label_key] for example in examples], dtype=np.int32)
    return {"image": np.stack(images).astype(np.uint8, copy=False), "label": labels}


def _fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to `size` (bilinear) and crops the centre square."""
    from PIL import Image  # only large-image datasets need it

    if image.ndim == 2:
        image = image[..., None]
    height, width, channels = image.shape
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((new_width, new_height), Image.Resampling.BILINEAR))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized.reshape(new_height, new_width, channels)[top : top + size, left : left + size]


def _read_in_memory(
    source: Sequence[Any], record_indices: np.ndarray, layout: _Layout, chunk: int = 8192
) -> Batch:
    parts = [
        _read(source, record_indices[start : start + chunk], layout)
        for start in range(0, len(record_indices), chunk)
    ]
    return {key: np.concatenate([part[key] for part in parts]) for key in ("image", "label")}


# --------------------------------------------------------------------------------------------
# Preprocessing (jitted, pure)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreprocessPlan:
    """Static description of the preprocessing of one dataset (hashable: a jit static arg)."""

    mean: tuple[float, ...]  # per channel, on images scaled to [0, 1]
    std: tuple[float, ...]
    crop_size: tuple[int, int]  # (height, width) after cropping
    crop_padding: int = 0  # zero padding around the image before a random crop
    augment: bool = False  # random crop + horizontal flip on train batches
    output_size: int | None = None  # resize (bilinear) to this square after cropping


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Scales images to [0, 1] and standardises each channel.

    Args:
      images: (N, H, W, C) pixel values in [0, 255] (uint8, or float after a resize).
      mean: C per-channel means of the [0, 1] images.
      std: C per-channel standard deviations.

    Returns:
      (N, H, W, C) float32 `(images / 255 - mean) / std`.
    """
    scaled = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop(
    images: jax.Array, rng: jax.Array, size: tuple[int, int], padding: int = 0
) -> jax.Array:
    """Crops each image at its own random offset, after zero padding.

    Args:
      images: (N, H, W, C).
      rng: PRNG key.
      size: (height, width) of the crops.
      padding: zero pixels added on every side first.

    Returns:
      (N, size[0], size[1], C), same dtype.
    """
    if padding:
        images = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    count, height, width, channels = images.shape
    if size[0] > height or size[1] > width:
        raise ValueError(f"Crop size {size} exceeds the (padded) images {height}x{width}.")
    rng_y, rng_x = jax.random.split(rng)
    tops = jax.random.randint(rng_y, (count,), 0, height - size[0] + 1)
    lefts = jax.random.randint(rng_x, (count,), 0, width - size[1] + 1)

    def crop(image: jax.Array, top: jax.Array, left: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (top, left, 0), (*size, channels))

    return jax.vmap(crop)(images, tops, lefts)


def center_crop(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Crops the centre (size[0], size[1]) window of (N, H, W, C) images."""
    height, width = images.shape[1:3]
    if size[0] > height or size[1] > width:
        raise ValueError(f"Crop size {size} exceeds the images {height}x{width}.")
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return images[:, top : top + size[0], left : left + size[1], :]


def random_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
    """Mirrors each (N, H, W, C) image left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def _preprocess(
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array | None,
    *,
    plan: PreprocessPlan,
    train: bool,
) -> tuple[jax.Array, jax.Array]:
    """Turns a uint8 batch into model input: augmentation (train only), resize, normalisation.

    Args:
      images: (N, H, W, C) uint8, as yielded by `Dataset.iterate`.
      labels: (N,) integer labels.
      rng: PRNG key; required when `train` and `plan.augment`, ignored otherwise.
      plan: what to do (static).
      train: whether this is a training batch (static).

    Returns:
      (images float32 (N, h, w, C), labels int32 (N,)).
    """
    if train and plan.augment:
        if rng is None:
            raise ValueError("Augmented training batches need an rng (see augmentation_key).")
        rng_crop, rng_flip = jax.random.split(rng)
        images = random_crop(images, rng_crop, plan.crop_size, plan.crop_padding)
        images = random_flip(images, rng_flip)
    else:
        images = center_crop(images, plan.crop_size)
    if plan.output_size is not None:
        shape = (images.shape[0], plan.output_size, plan.output_size, images.shape[3])
        images = jax.image.resize(images.astype(jnp.float32), shape, method="bilinear")
    images = normalize(images, plan.mean, plan.std)
    return images, jnp.asarray(labels).astype(jnp.int32)


preprocess = jax.jit(_preprocess, static_argnames=("plan", "train"))


# --------------------------------------------------------------------------------------------
# The dataset object
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split: which records of which TFDS split it holds, and how to read them."""

    name: str
    tfds_split: str  # the TFDS split its records come from
    record_indices: np.ndarray  # sorted indices into that TFDS split
    read: _Reader  # positions within this split -> batch

    @property
    def num_examples(self) -> int:
        return len(self.record_indices)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: its splits, shapes, deterministic batching and preprocessing.

    Use "validation" for every pruning decision (criteria, oracle, fitness); "test" only for the
    final report.
    """

    config: DataConfig
    spec: DatasetSpec
    splits: Mapping[str, Split]
    num_classes: int
    label_names: tuple[str, ...]
    raw_image_shape: tuple[int, int, int]  # uint8 images as `iterate` yields them
    image_shape: tuple[int, int, int]  # float32 images after `preprocess`
    plan: PreprocessPlan

    @property
    def num_examples(self) -> dict[str, int]:
        """Examples per split, e.g. {"train": 55000, "validation": 5000, "test": 10000}."""
        return {name: split.num_examples for name, split in self.splits.items()}

    def split(self, name: str) -> Split:
        """Returns a split by name, or raises a ValueError naming the valid ones."""
        if name not in self.splits:
            raise ValueError(f"Unknown split {name!r}; use one of {', '.join(self.splits)}.")
        return self.splits[name]

    def num_batches(
        self, split: str, batch_size: int | None = None, *, drop_remainder: bool = True
    ) -> int:
        """Number of batches in one epoch of a split.

        Args:
          split: split name.
          batch_size: defaults to `config.batch_size`.
          drop_remainder: whether a last, smaller batch is dropped.

        Returns:
          The number of batches `iterate` yields from batch 0.
        """
        batch_size = self.config.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        count = self.split(split).num_examples
        return count // batch_size if drop_remainder else -(-count // batch_size)

    def iterate(
        self,
        split: str,
        batch_size: int | None = None,
        *,
        seed: int | None = None,
        epoch: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        start_batch: int = 0,
        mesh: Mesh | None = None,
    ) -> Iterator[Batch]:
        """Yields the batches of one epoch, in an order fixed by (seed, epoch).

        In a run of several processes (``jax.distributed``), each process reads only the rows
        of a batch that its own devices hold and the batch is yielded as a global
        ``jax.Array`` split over the mesh's data axis: the same batch, with the same rows, as
        one process would read. A batch that does not split evenly over the devices (a short
        last batch, say) is read whole by every process and yielded as NumPy.

        Args:
          split: "train", "validation" or "test".
          batch_size: defaults to `config.batch_size`.
          seed: defaults to `config.seed`.
          epoch: epoch number; each epoch has its own order.
          shuffle: False visits the split in storage order (evaluation).
          drop_remainder: drop the last batch when it is smaller than `batch_size`.
          start_batch: first batch to yield, to resume an interrupted epoch exactly.
          mesh: the mesh the batches go to; by default every device when several processes
            run, and none (host batches) in a single process.

        Returns:
          An iterator of {"image": (B, H, W, C) uint8, "label": (B,) int32} batches: NumPy,
          or global arrays on the mesh when it spans several processes.
        """
        chosen = self.split(split)
        batch_size = self.config.batch_size if batch_size is None else batch_size
        count = self.num_batches(split, batch_size, drop_remainder=drop_remainder)
        if count == 0:
            raise ValueError(
                f"Split {split!r} has {chosen.num_examples} examples: no full batch of "
                f"{batch_size}. Lower batch_size or pass drop_remainder=False."
            )
        if not 0 <= start_batch <= count:
            raise ValueError(f"start_batch={start_batch} is outside 0..{count} for {split!r}.")
        seed = self.config.seed if seed is None else seed
        if shuffle:
            order = epoch_order(chosen.num_examples, seed=seed, epoch=epoch)
        else:
            order = np.arange(chosen.num_examples)
        if mesh is None and jax.process_count() > 1:
            mesh = sharding.make_mesh()

        def read(index: int) -> Batch:
            positions = order[index * batch_size : (index + 1) * batch_size]
            rows = sharding.process_rows(len(positions), mesh)
            if rows is None:
                return chosen.read(positions)
            return sharding.assemble_batch(chosen.read(positions[rows]), len(positions), mesh)

        return (read(index) for index in range(start_batch, count))

    def preprocess(
        self,
        images: jax.Array | np.ndarray,
        labels: jax.Array | np.ndarray,
        rng: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Jitted preprocessing of a batch with this dataset's plan (see `preprocess`).

        Args:
          images: (N, H, W, C) uint8 from `iterate`.
          labels: (N,) labels.
          rng: key for augmentation, needed when `train` and augmentation is on.
          train: apply training augmentation.

        Returns:
          (images float32 of shape (N, *image_shape), labels int32).
        """
        if train and self.plan.augment and rng is None:
            raise ValueError("Augmented training batches need an rng (see augmentation_key).")
        return preprocess(images, labels, rng if train else None, plan=self.plan, train=train)


def load(config: DataConfig | None = None, *, spec: DatasetSpec | None = None) -> Dataset:
    """Loads a dataset, preparing Fashion-MNIST on first use.

    Args:
      config: what to load; defaults to `DataConfig()` (Fashion-MNIST).
      spec: table entry to use instead of `DATASETS[config.name]` (another TFDS dataset).

    Returns:
      The dataset, with "train", "validation" and "test" splits.

    Raises:
      MissingDatasetError: the dataset is not prepared and cannot be built here.
    """
    config = DataConfig() if config is None else config
    if config.batch_size < 1:
        raise ValueError(f"DataConfig.batch_size must be positive, got {config.batch_size}.")
    spec = dataset_spec(config.name) if spec is None else spec
    data_dir = resolve_data_dir(config.data_dir)
    if spec.builds_locally:
        prepare(config.name, data_dir=data_dir, source_dir=config.source_dir)

    own_validation = config.validation_size is None and spec.validation_split is not None
    tfds_split_of = {
        "train": spec.train_split,
        "validation": spec.validation_split if own_validation else spec.train_split,
        "test": spec.test_split,
    }
    sources = {
        tfds_split: _open_source(config.name, spec, tfds_split, data_dir)
        for tfds_split in dict.fromkeys(tfds_split_of.values())
    }
    records = _choose_records(
        config, spec, {name: len(sources[tfds_split_of[name]]) for name in SPLIT_NAMES}
    )
    features = sources[spec.train_split].dataset_info.features
    layout, raw_shape, plan = _image_plan(config, spec, features[spec.image_key].shape)

    in_memory = config.in_memory
    if in_memory is None:
        held = sum(len(indices) for indices in records.values()) * math.prod(raw_shape)
        in_memory = held <= IN_MEMORY_LIMIT_BYTES
    splits = {}
    for tfds_split, source in sources.items():
        names = [name for name in SPLIT_NAMES if tfds_split_of[name] == tfds_split]
        if not in_memory:
            for name in names:
                reader = _SourceReader(source, records[name], layout)
                splits[name] = Split(name, tfds_split, records[name], reader)
            continue
        # Read every record these splits need once, then give each split its own rows.
        union = np.unique(np.concatenate([records[name] for name in names]))
        arrays = _read_in_memory(source, union, layout)
        for name in names:
            rows = np.searchsorted(union, records[name])
            reader = _ArrayReader(arrays["image"][rows], arrays["label"][rows])
            splits[name] = Split(name, tfds_split, records[name], reader)

    label_feature = features[spec.label_key]
    side = (plan.output_size,) * 2 if plan.output_size else plan.crop_size
    return Dataset(
        config=config,
        spec=spec,
        splits=MappingProxyType({name: splits[name] for name in SPLIT_NAMES}),
        num_classes=int(label_feature.num_classes),
        label_names=tuple(label_feature.names),
        raw_image_shape=raw_shape,
        image_shape=(*side, raw_shape[2]),
        plan=plan,
    )


def _image_plan(
    config: DataConfig, spec: DatasetSpec, feature_shape: Sequence[int | None]
) -> tuple[_Layout, tuple[int, int, int], PreprocessPlan]:
    """How images are read (host resize or not), their stored shape, and their preprocessing."""
    if len(feature_shape) != 3 or feature_shape[2] is None:
        raise ValueError(
            f"{spec.tfds_name}'s {spec.image_key!r} feature is not an HWC image: {feature_shape}."
        )
    channels = int(feature_shape[2])
    if len(spec.mean) != channels or len(spec.std) != channels:
        raise ValueError(
            f"{spec.tfds_name} has {channels} channels but its DatasetSpec gives "
            f"{len(spec.mean)} means and {len(spec.std)} stds; give one per channel."
        )
    augment = spec.augment_by_default if config.augment is None else config.augment
    if None in feature_shape[:2]:
        # Images of varying size: a fixed square on the host, crops of image_size on device.
        image_size = config.image_size or spec.default_image_size
        if image_size is None:
            raise ValueError(f"{spec.tfds_name} has images of varying size: set image_size.")
        host_size = round(image_size * RESIZE_MARGIN)
        plan = PreprocessPlan(spec.mean, spec.std, (image_size, image_size), 0, augment)
        layout = _Layout(spec.image_key, spec.label_key, host_size)
        return layout, (host_size, host_size, channels), plan
    height, width = int(feature_shape[0]), int(feature_shape[1])
    native = config.image_size in (None, height) and height == width
    output_size = None if native else config.image_size
    plan = PreprocessPlan(
        spec.mean, spec.std, (height, width), spec.crop_padding, augment, output_size
    )
    return _Layout(spec.image_key, spec.label_key, None), (height, width, channels), plan


def _choose_records(
    config: DataConfig, spec: DatasetSpec, source_sizes: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Record indices of each of our splits within its TFDS split (carve, then subsets)."""
    if config.validation_size is None and spec.validation_split is not None:
        records = {
            "train": np.arange(source_sizes["train"]),
            "validation": np.arange(source_sizes["validation"]),
        }
    else:
        size = (
            spec.default_validation_size
            if config.validation_size is None
            else config.validation_size
        )
        train, validation = carve_validation(
            source_sizes["train"], size, seed=config.validation_seed
        )
        records = {"train": train, "validation": validation}
    records["test"] = np.arange(source_sizes["test"])
    limits = {
        "train": config.train_examples,
        "validation": config.validation_examples,
        "test": config.test_examples,
    }
    return {
        name: indices
        if limits[name] is None
        else fixed_subset(indices, limits[name], seed=config.validation_seed)
        for name, indices in records.items()
    }


def preprocessed_batches(
    dataset: Dataset, split: str, batch_size: int, examples: int | None = None
) -> Iterator[dict[str, jax.Array]]:
    """The first `examples` of a split (all when None), in order, preprocessed for evaluation.

    What criteria, oracles and evaluations read: no shuffling, no augmentation, the last batch
    kept even when short. Criteria must be given the "validation" split, never "test".

    Raises:
      ValueError: a bad count, or more examples than the split holds.
    """
    available = dataset.num_examples[split]
    if batch_size < 1 or (examples is not None and examples < 1):
        raise ValueError(f"examples and batch_size must be >= 1, got {examples}, {batch_size}.")
    if examples is not None and examples > available:
        raise ValueError(
            f"{examples} examples asked of the {available} in the {split} split; ask for fewer."
        )
    wanted = available if examples is None else examples
    seen = 0
    for raw in dataset.iterate(split, min(batch_size, wanted), shuffle=False, drop_remainder=False):
        take = min(len(raw["label"]), wanted - seen)
        if take < len(raw["label"]):
            raw = {name: value[:take] for name, value in raw.items()}
        images, labels = dataset.preprocess(raw["image"], raw["label"], train=False)
        yield {"image": images, "label": labels}
        seen += take
        if seen == wanted:
            return
