"""Tests of the data pipeline: offline Fashion-MNIST builder, splits, batching, preprocessing."""

import gzip
import struct

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxprune import data

FASHION_DIR = data.DEFAULT_FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data dir of this test session, with Fashion-MNIST prepared once."""
    path = tmp_path_factory.mktemp("tensorflow_datasets")
    data.prepare(data_dir=path)
    return path


@pytest.fixture(scope="session")
def fashion(data_dir):
    return data.load(data.DataConfig(data_dir=str(data_dir)))


@pytest.fixture(scope="session")
def fashion_small(data_dir):
    config = data.DataConfig(
        data_dir=str(data_dir), train_examples=600, validation_examples=200, test_examples=300
    )
    return data.load(config)


def _read_all(dataset, split):
    return dataset.splits[split].read(np.arange(dataset.num_examples[split]))


# ---------------------------------------------------------------- Fashion-MNIST, real files


@pytest.mark.slow
def test_fashion_mnist_sizes_shapes_and_labels(fashion, data_dir):
    raw = {
        split: len(tfds.data_source("jaxprune_fashion_mnist", split=split, data_dir=data_dir))
        for split in ("train", "test")
    }
    assert raw == {"train": 60000, "test": 10000}
    assert fashion.num_examples == {"train": 55000, "validation": 5000, "test": 10000}
    assert fashion.num_classes == 10
    assert fashion.raw_image_shape == fashion.image_shape == (28, 28, 1)
    batch = next(fashion.iterate("train", 32))
    assert batch["image"].shape == (32, 28, 28, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    for split in data.SPLIT_NAMES:
        labels = _read_all(fashion, split)["label"]
        assert labels.min() == 0 and labels.max() == 9


@pytest.mark.slow
def test_fashion_mnist_holds_exactly_the_idx_files(fashion):
    idx_labels = {
        s: data.read_idx(FASHION_DIR / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")
    }
    idx_images = {
        s: data.read_idx(FASHION_DIR / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")
    }
    train, validation, test = (_read_all(fashion, s) for s in data.SPLIT_NAMES)
    carved_labels = np.concatenate([train["label"], validation["label"]])
    np.testing.assert_array_equal(
        np.bincount(carved_labels, minlength=10), np.bincount(idx_labels["train"], minlength=10)
    )
    np.testing.assert_array_equal(
        np.bincount(test["label"], minlength=10), np.bincount(idx_labels["t10k"], minlength=10)
    )
    # Same images, in some order: compare per-image pixel sums as multisets.
    carved_sums = np.concatenate([train["image"], validation["image"]]).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(
        np.sort(carved_sums), np.sort(idx_images["train"].sum(axis=(1, 2), dtype=np.int64))
    )
    np.testing.assert_array_equal(
        np.sort(test["image"].sum(axis=(1, 2, 3))),
        np.sort(idx_images["t10k"].sum(axis=(1, 2), dtype=np.int64)),
    )


def test_prepare_builds_once(data_dir, monkeypatch):
    info_file = data.prepare(data_dir=data_dir) / "dataset_info.json"
    stamp = info_file.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("Fashion-MNIST was rebuilt although it is prepared.")

    monkeypatch.setattr(data.JaxpruneFashionMnist, "download_and_prepare", no_rebuild)
    # Neither prepare nor load needs the idx files once the dataset is prepared.
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, "/nonexistent")
    data.prepare(data_dir=data_dir)
    small = data.load(data.DataConfig(data_dir=str(data_dir), train_examples=64))
    assert small.num_examples["train"] == 64
    assert info_file.stat().st_mtime_ns == stamp


def test_data_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    assert data.resolve_data_dir("/elsewhere") == data.Path("/elsewhere")
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert data.resolve_data_dir().parts[-2:] == ("jaxprune", "tensorflow_datasets")
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    assert data.resolve_fashion_mnist_dir() == tmp_path


# ---------------------------------------------------------------- missing data


def test_missing_fashion_mnist_names_the_apt_package(tmp_path):
    empty_source = tmp_path / "idx"
    empty_source.mkdir()
    config = data.DataConfig(data_dir=str(tmp_path / "tfds"), source_dir=str(empty_source))
    with pytest.raises(data.MissingDatasetError, match="apt-get install -y dataset-fashion-mnist"):
        data.load(config)


def test_missing_fashion_mnist_via_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(data.MissingDatasetError, match=data.FASHION_MNIST_DIR_ENV):
        data.prepare(data_dir=tmp_path / "tfds")


def test_missing_tfds_dataset_explains_tfds_build(tmp_path):
    with pytest.raises(data.MissingDatasetError, match="tfds build cifar10 .*array_record"):
        data.load(data.DataConfig(name="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(data.MissingDatasetError, match="tfds build oxford_flowers102"):
        data.prepare("oxford_flowers102", data_dir=tmp_path)


def test_unknown_names_are_rejected(fashion_small):
    with pytest.raises(ValueError, match="known datasets: .*cifar10"):
        data.load(data.DataConfig(name="mnist"))
    with pytest.raises(ValueError, match="Unknown split 'val'"):
        next(fashion_small.iterate("val"))


# ---------------------------------------------------------------- idx parsing


def _write_idx(path, array, magic=None):
    header = magic or struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "ok.gz"), array)
    _write_idx(tmp_path / "floats.gz", array, magic=struct.pack(">HBB", 0, 0x0D, 3))
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes"):
        data.read_idx(tmp_path / "floats.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">HBBII", 0, 8, 2, 5, 5) + b"\0" * 7)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.read_idx(tmp_path / "short.gz")


# ---------------------------------------------------------------- splits and determinism


def test_validation_is_disjoint_from_train_and_fixed(fashion, fashion_small):
    train = fashion.splits["train"].record_indices
    validation = fashion.splits["validation"].record_indices
    assert fashion.splits["validation"].tfds_split == "train"
    assert np.intersect1d(train, validation).size == 0
    np.testing.assert_array_equal(np.union1d(train, validation), np.arange(60000))
    # The carve is the same for every run: it does not depend on the shuffling seed.
    again_train, again_validation = data.carve_validation(60000, 5000, seed=0)
    np.testing.assert_array_equal(again_validation, validation)
    np.testing.assert_array_equal(again_train, train)
    other = data.carve_validation(60000, 5000, seed=1)[1]
    assert not np.array_equal(other, validation)
    # Subsets are drawn from the carved splits, so they stay disjoint too.
    small_train = fashion_small.splits["train"].record_indices
    small_validation = fashion_small.splits["validation"].record_indices
    assert np.isin(small_train, train).all() and np.isin(small_validation, validation).all()
    assert fashion_small.num_examples == {"train": 600, "validation": 200, "test": 300}


def test_subset_reads_the_same_examples_as_the_full_split(fashion, fashion_small):
    full = fashion.splits["test"]
    small = fashion_small.splits["test"]
    rows = np.searchsorted(full.record_indices, small.record_indices)
    chex.assert_trees_all_equal(full.read(rows), small.read(np.arange(small.num_examples)))


def test_epoch_order_is_a_function_of_seed_and_epoch(fashion_small):
    def epoch(**kwargs):
        return list(fashion_small.iterate("train", 64, **kwargs))

    first = epoch(seed=3, epoch=0)
    assert len(first) == 600 // 64
    chex.assert_trees_all_equal(first, epoch(seed=3, epoch=0))
    labels = lambda batches: np.concatenate([b["label"] for b in batches])
    images = lambda batches: np.concatenate([b["image"] for b in batches])
    assert not np.array_equal(images(first), images(epoch(seed=3, epoch=1)))
    assert not np.array_equal(images(first), images(epoch(seed=4, epoch=0)))
    # An epoch is a permutation: with drop_remainder=False every example appears once.
    everything = epoch(seed=3, epoch=1, drop_remainder=False)
    assert sum(len(b["label"]) for b in everything) == 600
    np.testing.assert_array_equal(
        np.sort(images(everything).sum(axis=(1, 2, 3))),
        np.sort(_read_all(fashion_small, "train")["image"].sum(axis=(1, 2, 3))),
    )
    np.testing.assert_array_equal(
        np.bincount(labels(everything), minlength=10),
        np.bincount(_read_all(fashion_small, "train")["label"], minlength=10),
    )


def test_start_batch_resumes_exactly(fashion_small):
    uninterrupted = list(fashion_small.iterate("train", 50, seed=7, epoch=2))
    resumed = list(fashion_small.iterate("train", 50, seed=7, epoch=2, start_batch=5))
    chex.assert_trees_all_equal(resumed, uninterrupted[5:])
    assert list(fashion_small.iterate("train", 50, seed=7, epoch=2, start_batch=12)) == []


def test_unshuffled_iteration_is_storage_order(fashion_small):
    batches = list(fashion_small.iterate("test", 128, shuffle=False, drop_remainder=False))
    assert [len(b["label"]) for b in batches] == [128, 128, 44]
    chex.assert_trees_all_equal(
        {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")},
        _read_all(fashion_small, "test"),
    )


def test_bad_batching_arguments_raise(fashion_small):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        fashion_small.iterate("train", 0)
    with pytest.raises(ValueError, match="no full batch"):
        fashion_small.iterate("validation", 500)
    with pytest.raises(ValueError, match="start_batch=99"):
        fashion_small.iterate("train", 100, start_batch=99)
    with pytest.raises(ValueError, match="non-negative"):
        fashion_small.iterate("train", 100, epoch=-1)
    with pytest.raises(ValueError, match="validation_size=0"):
        data.carve_validation(100, 0, seed=0)
    with pytest.raises(ValueError, match="subset of 700"):
        data.fixed_subset(np.arange(600), 700, seed=0)


def test_augmentation_key_is_a_function_of_seed_epoch_batch():
    key = data.augmentation_key(1, 2, 3)
    same = data.augmentation_key(1, 2, 3)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(same))
    for other in (data.augmentation_key(1, 2, 4), data.augmentation_key(1, 3, 3)):
        assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(other))


# ---------------------------------------------------------------- preprocessing


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_normalisation_matches_numpy(fashion_small):
    batch = next(fashion_small.iterate("validation", 16, shuffle=False))
    images, labels = fashion_small.preprocess(batch["image"], batch["label"])
    expected = (batch["image"].astype(np.float32) / 255.0 - 0.2860) / 0.3530
    chex.assert_type(images, np.float32)
    np.testing.assert_allclose(images, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(labels, batch["label"])
    rgb = _images((4, 5, 5, 3))
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    np.testing.assert_allclose(
        data.normalize(rgb, mean, std),
        (rgb / 255.0 - np.array(mean)) / np.array(std),
        rtol=1e-5,
        atol=1e-5,
    )


def test_random_crop_takes_windows_of_the_padded_images():
    images = _images((6, 8, 8, 2))
    crops = np.asarray(data.random_crop(images, jax.random.key(0), (8, 8), padding=2))
    assert crops.shape == images.shape
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = []
    for crop, source in zip(crops, padded, strict=True):
        windows = [
            (top, left)
            for top in range(5)
            for left in range(5)
            if np.array_equal(source[top : top + 8, left : left + 8], crop)
        ]
        assert windows, "a crop is not a window of its padded image"
        offsets.append(windows[0])
    assert len(set(offsets)) > 1  # offsets differ between examples
    smaller = data.random_crop(images, jax.random.key(0), (5, 3))
    assert smaller.shape == (6, 5, 3, 2)
    with pytest.raises(ValueError, match="exceeds"):
        data.random_crop(images, jax.random.key(0), (9, 8))


def test_random_flip_mirrors_some_images():
    images = _images((16, 4, 6, 1))
    flipped = np.asarray(data.random_flip(images, jax.random.key(1)))
    mirrored = np.array(
        [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images, strict=True)]
    )
    kept = np.array([np.array_equal(f, i) for f, i in zip(flipped, images, strict=True)])
    assert (mirrored | kept).all() and mirrored.any() and kept.any()


def test_centre_crop():
    images = _images((2, 10, 9, 3))
    np.testing.assert_array_equal(data.center_crop(images, (4, 5)), images[:, 3:7, 2:7])


def test_augmentation_is_deterministic_given_the_key(data_dir):
    dataset = data.load(
        data.DataConfig(data_dir=str(data_dir), augment=True, train_examples=64, test_examples=8)
    )
    batch = next(dataset.iterate("train", 32, seed=0))
    run = lambda key: dataset.preprocess(batch["image"], batch["label"], key, train=True)
    first, again = run(data.augmentation_key(0, 0, 0)), run(data.augmentation_key(0, 0, 0))
    chex.assert_trees_all_equal(first, again)
    chex.assert_shape(first[0], (32, 28, 28, 1))
    assert not np.array_equal(first[0], run(data.augmentation_key(0, 0, 1))[0])
    # Evaluation batches are never augmented.
    plain = dataset.preprocess(batch["image"], batch["label"])
    chex.assert_trees_all_close(
        plain[0], (batch["image"].astype(np.float32) / 255.0 - 0.2860) / 0.3530, atol=1e-6
    )
    with pytest.raises(ValueError, match="need an rng"):
        dataset.preprocess(batch["image"], batch["label"], train=True)


def test_preprocess_resizes_fixed_size_images(data_dir):
    dataset = data.load(
        data.DataConfig(data_dir=str(data_dir), image_size=32, train_examples=64, test_examples=8)
    )
    assert dataset.raw_image_shape == (28, 28, 1) and dataset.image_shape == (32, 32, 1)
    batch = next(dataset.iterate("test", 8, shuffle=False))
    images, _ = dataset.preprocess(batch["image"], batch["label"])
    chex.assert_shape(images, (8, 32, 32, 1))


# ---------------------------------------------------------------- other datasets via mock_data


def test_cifar10_through_mock_data(tmp_path):
    config = data.DataConfig(
        name="cifar10", data_dir=str(tmp_path), validation_size=6, batch_size=8
    )
    with tfds.testing.mock_data(num_examples=30):
        dataset = data.load(config)
    assert dataset.num_examples == {"train": 24, "validation": 6, "test": 30}
    assert dataset.num_classes == 10
    assert dataset.raw_image_shape == dataset.image_shape == (32, 32, 3)
    assert dataset.plan.augment and dataset.plan.crop_padding == 4
    batch = next(dataset.iterate("train", epoch=1))
    chex.assert_shape(batch["image"], (8, 32, 32, 3))
    assert batch["image"].dtype == np.uint8 and (batch["label"] < 10).all()
    images, labels = dataset.preprocess(
        batch["image"], batch["label"], data.augmentation_key(0, 1, 0), train=True
    )
    chex.assert_shape(images, (8, 32, 32, 3))
    chex.assert_type([images, labels], [np.float32, np.int32])
    mean = np.array([0.4914, 0.4822, 0.4465])
    std = np.array([0.2470, 0.2435, 0.2616])
    evaluated, _ = dataset.preprocess(batch["image"], batch["label"])
    np.testing.assert_allclose(evaluated, (batch["image"] / 255.0 - mean) / std, atol=1e-5)


@pytest.mark.parametrize("in_memory", [True, False])
def test_flowers_through_mock_data(tmp_path, in_memory):
    config = data.DataConfig(
        name="oxford_flowers102", data_dir=str(tmp_path), image_size=64, in_memory=in_memory
    )
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load(config)
        assert dataset.num_classes == 102
        # Flowers has its own validation split: nothing is carved from train.
        assert dataset.splits["validation"].tfds_split == "validation"
        assert dataset.num_examples == {"train": 12, "validation": 12, "test": 12}
        assert dataset.raw_image_shape == (73, 73, 3) and dataset.image_shape == (64, 64, 3)
        batch = next(dataset.iterate("train", 4, seed=0))
        expected = tfds.data_source("oxford_flowers102", split="train")
    chex.assert_shape(batch["image"], (4, 73, 73, 3))
    order = data.epoch_order(12, seed=0, epoch=0)[:4]
    np.testing.assert_array_equal(batch["label"], [expected[int(i)]["label"] for i in order])
    train, _ = dataset.preprocess(batch["image"], batch["label"], jax.random.key(0), train=True)
    evaluated, _ = dataset.preprocess(batch["image"], batch["label"])
    chex.assert_shape([train, evaluated], (4, 64, 64, 3))
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    centre = batch["image"][:, 4:68, 4:68] / 255.0
    np.testing.assert_allclose(evaluated, (centre - mean) / std, atol=1e-5)


def test_host_resize_fits_the_shorter_side():
    tall = _images((40, 20, 3))
    fitted = data._fit_square(tall, 10)
    assert fitted.shape == (10, 10, 3)
    gray = data._fit_square(_images((7, 9)), 7)
    assert gray.shape == (7, 7, 1)


def test_in_memory_and_lazy_reads_agree_under_mock_data(tmp_path):
    def first_batches(in_memory):
        config = data.DataConfig(
            name="caltech_birds2011",
            data_dir=str(tmp_path),
            validation_size=4,
            image_size=16,
            in_memory=in_memory,
        )
        with tfds.testing.mock_data(num_examples=10):
            dataset = data.load(config)
            return dataset, list(dataset.iterate("train", 3, seed=5, epoch=1))

    eager, eager_batches = first_batches(True)
    lazy, lazy_batches = first_batches(False)
    assert eager.num_classes == 200 and eager.num_examples["validation"] == 4
    chex.assert_trees_all_equal(eager_batches, lazy_batches)


def test_imagenette_reports_its_validation_split_as_test(tmp_path):
    config = data.DataConfig(name="imagenette", data_dir=str(tmp_path), validation_size=3)
    with tfds.testing.mock_data(num_examples=9):
        dataset = data.load(config)
    assert dataset.splits["test"].tfds_split == "validation"
    assert dataset.splits["validation"].tfds_split == "train"
    assert dataset.num_examples == {"train": 6, "validation": 3, "test": 9}
    assert dataset.image_shape == (224, 224, 3)
