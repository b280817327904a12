"""Functionality descriptors (Qin et al. 2019, as jaxprune reconstructs it): the ascent's read
point and objective, the transformation of each step, the response descriptor, the reference
similarity on real images and the two measurements of a descriptor, pinned against NumPy."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
from core_helpers import init

from jaxprune.criteria.functionality import (
    VisualizationConfig,
    _affine_view,
    cell_means,
    cosine_similarity,
    filter_objectives,
    image_descriptors,
    maximization_images,
    mutual_best_matches,
    read_points,
    response_descriptors,
    response_similarity,
    similarity_agreement,
    start_image,
)
from jaxprune.graph import channel_graph
from jaxprune.trace import trace_apply

SHAPE = (6, 6, 1)
EPS = 1e-5  # flax BatchNorm's default epsilon


class ConvBNPool(nn.Module):
    """conv0 (3 filters) -> BN -> relu -> 2x2 max pool -> conv1 (4 filters) -> relu -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(3, (3, 3), use_bias=False, name="conv0")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn0")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


class OneConv(nn.Module):
    """One 3x3 conv without bias -> relu -> flatten -> dense."""

    filters: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.filters, (3, 3), use_bias=False, name="conv")(x))
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """A stride-1 'SAME' cross-correlation in NumPy: x (N, H, W, I), kernel (3, 3, I, O)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for a in range(3):
        for b in range(3):
            out += np.einsum("nhwi,io->nhwo", padded[:, a : a + h, b : b + w], kernel[a, b])
    return out if bias is None else out + bias


def numpy_forward(variables, x: np.ndarray) -> dict[str, np.ndarray]:
    """ConvBNPool by hand: conv0's BN output, its gate (pooled relu) and conv1's output."""
    p, s = variables["params"], variables["batch_stats"]
    pre0 = conv_same(x, np.asarray(p["conv0"]["kernel"], np.float64))
    pre0 = (pre0 - np.asarray(s["bn0"]["mean"])) / np.sqrt(np.asarray(s["bn0"]["var"]) + EPS)
    pre0 = pre0 * np.asarray(p["bn0"]["scale"]) + np.asarray(p["bn0"]["bias"])
    relu0 = np.maximum(pre0, 0.0)
    n, h, w, c = relu0.shape
    gate0 = relu0.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    pre1 = conv_same(gate0, np.asarray(p["conv1"]["kernel"]), np.asarray(p["conv1"]["bias"]))
    return {"pre0": pre0, "gate0": gate0, "pre1": pre1, "gate1": np.maximum(pre1, 0.0)}


@pytest.fixture(scope="module")
def pooled_model():
    model = ConvBNPool()
    variables = init(model, jnp.zeros((1, *SHAPE)))
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *SHAPE)))
    images = np.random.default_rng(0).normal(size=(5, *SHAPE)).astype(np.float32)
    return model, variables, graph, images


# ---------------------------------------------------------------------------------------------
# Where and what the ascent reads


def test_preactivation_read_points_walk_back_through_pooling_and_relu(pooled_model):
    model, variables, graph, images = pooled_model
    program = trace_apply(model.apply, variables, jnp.zeros((1, *SHAPE)), train=False)
    gate = read_points(program, graph)
    pre = read_points(program, graph, preactivation=True)
    assert gate["conv0"][0].shape == (1, 3, 3, 3)  # after the pooling
    assert pre["conv0"][0].shape == (1, 6, 6, 3)  # the BatchNorm output
    assert pre["conv1"][0].shape == gate["conv1"][0].shape == (1, 3, 3, 4)
    assert pre["conv1"][0].value_id != gate["conv1"][0].value_id


@pytest.mark.parametrize("preactivation", [False, True])
@pytest.mark.parametrize("objective", ["mean", "center"])
def test_filter_objectives_match_numpy(pooled_model, objective, preactivation):
    model, variables, graph, images = pooled_model
    config = VisualizationConfig(objective=objective, preactivation=preactivation)
    reference = numpy_forward(variables, images.astype(np.float64))
    for group, (pre, gate) in {"conv0": ("pre0", "gate0"), "conv1": ("pre1", "gate1")}.items():
        maps = reference[pre if preactivation else gate]
        if objective == "mean":
            expected = maps.mean(axis=(1, 2))
        else:
            expected = maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
        got = filter_objectives(model.apply, graph, variables, group, images, config, batch_size=2)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_centre_preactivation_ascent_step_is_the_kernel_at_the_centre():
    # A linear filter's centre unit has the gradient "its kernel, placed at the centre", so one
    # step from the start image adds step_size * kernel / rms(kernel image).
    model = OneConv()
    shape = (8, 8, 1)
    variables = model.init(jax.random.key(1), jnp.zeros((1, *shape)))
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *shape)))
    config = VisualizationConfig(
        steps=1,
        step_size=0.3,
        l2_weight=0.0,
        tv_weight=0.0,
        jitter=0,
        blur_every=0,
        objective="center",
        preactivation=True,
    )
    images = np.asarray(maximization_images(model.apply, graph, variables, "conv", shape, config))
    kernel = np.asarray(variables["params"]["conv"]["kernel"])[:, :, 0, :]
    start = np.asarray(start_image(shape, config))
    for f in range(3):
        grad = np.zeros(shape)
        grad[3:6, 3:6, 0] = kernel[..., f]  # output (4, 4) reads inputs 3..5 on each axis
        expected = start + 0.3 * grad / np.sqrt(np.mean(grad**2))
        np.testing.assert_allclose(images[f], expected, rtol=1e-5, atol=1e-6)


def test_affine_view_matches_scipy_and_quarter_turns():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(7, 7, 2)).astype(np.float32)
    same = _affine_view(jnp.asarray(image), jnp.float32(0.0), jnp.float32(1.0))
    np.testing.assert_allclose(same, image, atol=1e-6)
    turned = _affine_view(jnp.asarray(image), jnp.float32(np.pi / 2), jnp.float32(1.0))
    np.testing.assert_allclose(turned, np.rot90(image, k=1, axes=(0, 1)), atol=1e-5)
    angle, factor = 0.3, 1.2
    got = np.asarray(_affine_view(jnp.asarray(image), jnp.float32(angle), jnp.float32(factor)))
    rows, cols = np.meshgrid(np.arange(7.0), np.arange(7.0), indexing="ij")
    dy, dx = rows - 3.0, cols - 3.0
    src = [
        3.0 + (np.cos(angle) * dy + np.sin(angle) * dx) / factor,
        3.0 + (-np.sin(angle) * dy + np.cos(angle) * dx) / factor,
    ]
    for c in range(2):
        expected = scipy.ndimage.map_coordinates(image[..., c], src, order=1, mode="nearest")
        np.testing.assert_allclose(got[..., c], expected, atol=1e-5)


@pytest.mark.slow
def test_transformed_ascent_is_seeded_and_the_same_view_for_every_filter():
    model = OneConv(filters=2)
    shape = (8, 8, 1)
    variables = model.init(jax.random.key(3), jnp.zeros((1, *shape)))
    kernel = np.array(variables["params"]["conv"]["kernel"])
    kernel[..., 1] = kernel[..., 0]  # two identical filters
    variables = {"params": {**variables["params"], "conv": {"kernel": jnp.asarray(kernel)}}}
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *shape)))
    config = VisualizationConfig(steps=6, step_size=0.1, scale=0.2, rotation=20.0, seed=4)
    first = np.asarray(maximization_images(model.apply, graph, variables, "conv", shape, config))
    again = np.asarray(maximization_images(model.apply, graph, variables, "conv", shape, config))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[0], first[1])
    plain = dataclasses.replace(config, scale=0.0, rotation=0.0)
    other = np.asarray(maximization_images(model.apply, graph, variables, "conv", shape, plain))
    assert np.max(np.abs(first - other)) > 1e-3


def test_bad_objective_and_transforms_are_refused(pooled_model):
    model, variables, graph, images = pooled_model
    with pytest.raises(ValueError, match="objective"):
        filter_objectives(
            model.apply, graph, variables, "conv0", images, VisualizationConfig(objective="max")
        )
    with pytest.raises(ValueError, match="scale and rotation"):
        maximization_images(
            model.apply, graph, variables, "conv0", SHAPE, VisualizationConfig(rotation=-1.0)
        )


# ---------------------------------------------------------------------------------------------
# Descriptors


def test_cell_means_average_runs_of_positions():
    maps = np.arange(2 * 5 * 3 * 2, dtype=np.float64).reshape(2, 5, 3, 2)
    pooled = cell_means(maps, 2)
    # Rows split [0, 1, 2] and [3, 4]; columns split [0, 1] and [2].
    expected = np.empty((2, 2, 2, 2))
    for i, rows in enumerate(([0, 1, 2], [3, 4])):
        for j, cols in enumerate(([0, 1], [2])):
            expected[:, i, j] = maps[:, rows][:, :, cols].mean(axis=(1, 2))
    np.testing.assert_allclose(pooled, expected)
    np.testing.assert_array_equal(cell_means(maps, 9), maps)
    np.testing.assert_array_equal(cell_means(maps, None), maps)


@pytest.mark.parametrize("resolution", [None, 2])
def test_response_descriptors_match_numpy(pooled_model, resolution):
    model, variables, graph, images = pooled_model
    got = response_descriptors(
        model.apply, graph, variables, "conv0", images, resolution=resolution, batch_size=2
    )
    gate = numpy_forward(variables, images.astype(np.float64))["gate0"]  # (5, 3, 3, 3)
    if resolution == 2:
        cells = [[0, 1], [2]]
        gate = np.stack(
            [
                np.stack([gate[:, r][:, :, c].mean(axis=(1, 2)) for c in cells], axis=1)
                for r in cells
            ],
            axis=1,
        )
    expected = np.stack([gate[..., f].ravel() for f in range(3)])
    expected = expected - expected.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # The cosine of two centred descriptors is the Pearson correlation of the responses.
    np.testing.assert_allclose(
        cosine_similarity(got)[0, 1],
        np.corrcoef(expected[0], expected[1])[0, 1],
        rtol=1e-4,
    )


def test_spectrum_descriptor_is_the_dft_magnitude_and_ignores_circular_shifts():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(3, 6, 5, 1))
    got = image_descriptors(images, "spectrum")
    for i in range(3):
        x = images[i, ..., 0]
        x = (x - x.mean()) / x.std()
        np.testing.assert_allclose(got[i], np.abs(np.fft.fft2(x)).ravel(), atol=1e-10)
    shifted = np.roll(images, (2, 3), axis=(1, 2))
    np.testing.assert_allclose(image_descriptors(shifted, "spectrum"), got, atol=1e-10)


def test_response_similarity_is_the_pearson_correlation_over_images_and_positions():
    model = OneConv(filters=4)
    variables = model.init(jax.random.key(6), jnp.zeros((1, *SHAPE)))
    kernel = np.array(variables["params"]["conv"]["kernel"])
    kernel[..., 3] = 0.0  # a filter that never fires
    variables = {"params": {**variables["params"], "conv": {"kernel": jnp.asarray(kernel)}}}
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *SHAPE)))
    images = np.random.default_rng(7).normal(size=(9, *SHAPE)).astype(np.float32)
    got = response_similarity(model.apply, graph, variables, "conv", images, batch_size=4)
    maps = np.maximum(conv_same(images.astype(np.float64), kernel.astype(np.float64)), 0.0)
    flat = maps.reshape(-1, 4)
    expected = np.corrcoef(flat[:, :3].T)
    np.testing.assert_allclose(got[:3, :3], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[3], [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(got, got.T)


# ---------------------------------------------------------------------------------------------
# Measurements


def test_mutual_best_matches_on_a_constructed_case():
    first = np.eye(5)
    second = np.eye(5)
    # Filter 1's second descriptor is closer to filter 2's first (0.8) than to its own (0.6):
    # filter 1 is still the best match of its own first descriptor (row), but not mutually.
    second[1] = [0.0, 0.6, 0.8, 0.0, 0.0]
    # Filters 3 and 4 end with one descriptor: a tie, neither is stable.
    second[3] = [0.0, 0.0, 0.0, 0.7, 0.7]
    second[4] = [0.0, 0.0, 0.0, 0.7, 0.7]
    np.testing.assert_array_equal(
        mutual_best_matches(first, second), [True, False, True, False, False]
    )
    np.testing.assert_array_equal(mutual_best_matches(first, first), [True] * 5)
    # Scale does not matter, order of the filters does.
    np.testing.assert_array_equal(mutual_best_matches(3.0 * first, first), [True] * 5)
    np.testing.assert_array_equal(
        mutual_best_matches(first, first[::-1]), [False, False, True, False, False]
    )
    with pytest.raises(ValueError, match="one shape"):
        mutual_best_matches(first, second[:4])


def test_similarity_agreement_is_spearman_over_distinct_pairs():
    rng = np.random.default_rng(8)
    a = cosine_similarity(rng.normal(size=(7, 4)))
    b = cosine_similarity(rng.normal(size=(7, 4)))
    upper = np.triu_indices(7, 1)
    expected = scipy.stats.spearmanr(a[upper], b[upper]).statistic
    assert similarity_agreement(a, b) == pytest.approx(expected, abs=1e-12)
    assert similarity_agreement(a, a) == pytest.approx(1.0)
    # Only the distinct pairs count: the diagonal and the lower triangle change nothing.
    lower = np.tril(rng.normal(size=(7, 7)))
    assert similarity_agreement(a + lower, b) == pytest.approx(expected, abs=1e-12)
