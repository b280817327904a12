"""Functionality-oriented pruning (Qin et al. 2019): images, similarity, clusters, the method."""

from __future__ import annotations

import dataclasses
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import init
from toy_models import ConvBNDense

from jaxprune import criteria
from jaxprune.criteria.functionality import (
    VisualizationConfig,
    channel_means,
    cosine_similarity,
    filter_descriptors,
    image_descriptors,
    maximization_images,
    normalize_images,
    response_maps,
    response_patterns,
    responsive_filters,
)
from jaxprune.gates import gate_points, gated_call
from jaxprune.graph import channel_graph
from jaxprune.methods import clustering, functional
from jaxprune.methods.functional import (
    ClusteringConfig,
    FunctionalConfig,
    check_config,
    choose_representatives,
    cluster_filters,
    functional_layers,
    functional_prune,
    kept_count,
    layer_images,
)
from jaxprune.model import Model
from jaxprune.run import RunDir, RunMismatchError
from jaxprune.surgery import keep_to_masks

SHAPE = (8, 8, 1)
FAST = VisualizationConfig(steps=12, step_size=0.1, jitter=1, blur_every=4)


class HandMadeConv(nn.Module):
    """One 3x3 conv (4 filters) -> relu -> flatten -> dense; kernels are set by hand below."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def hand_made_variables(silent: tuple[int, ...] = ()):
    """Filters 0 and 1: the same vertical edge; 2: a horizontal edge; 3: a centre spot.

    The filters in `silent` get a zero kernel: always 0 after the ReLU, so no gradient.
    """
    model = HandMadeConv()
    variables = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
    vertical = np.array([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]], np.float32)
    horizontal = vertical.T.copy()
    spot = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32) / 4
    kernel = np.stack([vertical, vertical, horizontal, spot], axis=-1)[:, :, None, :]
    kernel[..., list(silent)] = 0.0
    params = jax.tree_util.tree_map(lambda v: v, variables["params"])
    params = {**params, "conv": {"kernel": jnp.asarray(kernel)}}
    return model, {"params": params}


@pytest.fixture(scope="module")
def hand_made():
    model, variables = hand_made_variables()
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *SHAPE)))
    return model, variables, graph


@pytest.fixture(scope="module")
def toy():
    model = ConvBNDense()
    x = jnp.zeros((1, *SHAPE))
    variables = init(model, x)
    return model, variables, channel_graph(model.apply, variables, x)


# ---------------------------------------------------------------------------------------------
# Similarity and clustering on NumPy references


def test_cosine_similarity_matches_numpy():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(5, 7))
    d[3] = 0.0  # a zero row is similar to nothing but itself
    expected = np.eye(5)
    for i in range(5):
        for j in range(5):
            ni, nj = np.linalg.norm(d[i]), np.linalg.norm(d[j])
            if i != j and ni > 0 and nj > 0:
                expected[i, j] = d[i] @ d[j] / (ni * nj)
    np.testing.assert_allclose(cosine_similarity(d), expected, atol=1e-12)


def test_standardised_pixel_similarity_is_the_pearson_correlation():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 6, 6, 1)) * rng.uniform(0.5, 3, (4, 1, 1, 1)) + 2.0
    similarity = cosine_similarity(image_descriptors(images))
    np.testing.assert_allclose(similarity, np.corrcoef(images.reshape(4, -1)), atol=1e-10)
    # Brightness and contrast do not change a standardised image.
    np.testing.assert_allclose(
        normalize_images(images[:1] * 5 + 3), normalize_images(images[:1]), atol=1e-10
    )


def test_pooled_descriptor_is_a_2x2_average():
    images = np.arange(2 * 4 * 4 * 1, dtype=np.float64).reshape(2, 4, 4, 1)
    pooled = image_descriptors(images, "pooled", normalization="none")
    np.testing.assert_allclose(pooled[0], [2.5, 4.5, 10.5, 12.5])


def test_identical_descriptors_share_a_cluster_and_orthogonal_ones_do_not():
    a, b, c = np.eye(3)
    descriptors = np.stack([a, a, b, c, 0.99 * c + 0.01 * a])
    similarity = cosine_similarity(descriptors)
    labels = clustering.agglomerative_by_threshold(similarity, 0.5)
    np.testing.assert_array_equal(labels, [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(clustering.kmeans(descriptors, 3, seed=0), [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(
        clustering.agglomerative_by_threshold(similarity, 1.01), [0, 1, 2, 3, 4]
    )


def reference_average_linkage(similarity: np.ndarray, clusters: int) -> list[set[int]]:
    """Naive UPGMA: merge the pair of clusters with the highest mean similarity."""
    parts = [{i} for i in range(len(similarity))]
    while len(parts) > clusters:
        best, pair = -np.inf, None
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                mean = np.mean([similarity[a, b] for a in parts[i] for b in parts[j]])
                if mean > best:
                    best, pair = mean, (i, j)
        i, j = pair
        parts[i] = parts[i] | parts.pop(j)
    return parts


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.nonzero(labels == c)[0].tolist()) for c in np.unique(labels)}


@pytest.mark.parametrize("clusters", [1, 3, 5, 9])
def test_cut_at_a_count_matches_naive_average_linkage_and_its_threshold(clusters):
    rng = np.random.default_rng(clusters)
    similarity = cosine_similarity(rng.normal(size=(9, 4)))
    labels, threshold = clustering.agglomerative_by_count(similarity, clusters)
    assert len(np.unique(labels)) == clusters
    assert partition(labels) == {
        frozenset(p) for p in reference_average_linkage(similarity, clusters)
    }
    # The threshold read off the dendrogram gives the same clusters.
    np.testing.assert_array_equal(
        clustering.agglomerative_by_threshold(similarity, threshold), labels
    )
    tree = clustering.merge_tree(similarity)
    assert np.all(np.diff(tree.linkage) <= 1e-12)  # average linkage is monotone


def test_kmeans_finds_separated_directions_and_is_seeded():
    rng = np.random.default_rng(3)
    centres = np.eye(4)[:3] * 5
    x = np.concatenate([c + rng.normal(0, 0.1, (6, 4)) for c in centres])
    labels = clustering.kmeans(x, 3, seed=0)
    assert partition(labels) == {frozenset(range(k * 6, k * 6 + 6)) for k in range(3)}
    np.testing.assert_array_equal(labels, clustering.kmeans(x, 3, seed=0))


def test_representatives_are_the_best_scored_or_the_most_central():
    labels = np.array([0, 0, 1, 1, 1, 2])
    scores = np.array([0.1, 0.5, 3.0, 3.0, 1.0, -2.0])
    np.testing.assert_array_equal(choose_representatives(labels, scores=scores), [1, 2, 5])
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    descriptors = np.array(
        [[1, 0.3], [1, 0], [1, -0.2], [0.2, 1], [0, 1], [-0.3, 1], [1, 1]], float
    )
    np.testing.assert_array_equal(
        choose_representatives(labels, descriptors=descriptors), [1, 4, 6]
    )


# ---------------------------------------------------------------------------------------------
# Activation-maximisation images


def test_images_raise_the_target_filters_activation(hand_made):
    model, variables, graph = hand_made
    config = dataclasses.replace(FAST, jitter=0, blur_every=0, steps=20)
    images, objective = maximization_images(
        model.apply, graph, variables, "conv", SHAPE, config, with_objective=True
    )
    chex.assert_shape(images, (4, *SHAPE))
    chex.assert_shape(objective, (4, 20))
    objective = np.asarray(objective)
    assert np.all(objective[:, -1] > objective[:, 0] + 0.1)
    assert np.mean(np.diff(objective, axis=1) >= 0) > 0.9
    # Read back independently: each final image drives its own filter above the start image.
    points = gate_points(model.apply, graph, variables, images[:1])["conv"]
    _, captured = gated_call(model.apply, graph, variables, images, capture=True)
    own = np.asarray(
        [channel_means([captured["conv"][0][i : i + 1]], points, 4)[i] for i in range(4)]
    )
    assert np.all(own > objective[:, 0] + 0.1)


def test_identical_filters_get_one_image_and_one_cluster_orthogonal_ones_do_not(hand_made):
    model, variables, graph = hand_made
    images = maximization_images(model.apply, graph, variables, "conv", SHAPE, FAST)
    np.testing.assert_array_equal(images[0], images[1])
    similarity = cosine_similarity(image_descriptors(images))
    assert similarity[0, 1] == pytest.approx(1.0)
    assert similarity[0, 2] < 0.5
    labels = clustering.agglomerative_by_threshold(similarity, 0.5)
    assert labels[0] == labels[1]
    assert labels[2] != labels[0] and labels[3] != labels[0]


def test_silent_filters_share_an_image_but_are_never_merged():
    model, variables = hand_made_variables(silent=(1, 3))
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *SHAPE)))
    images = maximization_images(model.apply, graph, variables, "conv", SHAPE, FAST)
    # No gradient reaches a silent filter: both end with the same penalty-shaped picture.
    np.testing.assert_array_equal(images[1], images[3])
    responsive = responsive_filters(model.apply, graph, variables, "conv", images, FAST)
    np.testing.assert_array_equal(responsive, [True, False, True, False])
    chunked = dataclasses.replace(FAST, chunk_size=3)
    np.testing.assert_array_equal(
        responsive_filters(model.apply, graph, variables, "conv", images, chunked), responsive
    )
    descriptors = image_descriptors(images)
    similarity = cosine_similarity(descriptors)
    config = ClusteringConfig(threshold=0.5)
    merged, _ = cluster_filters(
        similarity, descriptors, dataclasses.replace(config, separate_unresponsive=False)
    )
    assert merged[1] == merged[3]
    labels, _ = cluster_filters(similarity, descriptors, config, responsive=responsive)
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="one image per filter"):
        responsive_filters(model.apply, graph, variables, "conv", images[:3], FAST)


@pytest.mark.parametrize("method", ["agglomerative", "kmeans"])
def test_a_count_cut_keeps_unresponsive_filters_alone(method):
    # Filters 0-2 alike, 3-4 alike, 5-6 unresponsive (identical descriptors).
    a, b, c = np.eye(3)
    descriptors = np.stack([a, a + 0.1 * b, a + 0.1 * c, b, b + 0.1 * c, c, c])
    similarity = cosine_similarity(descriptors)
    responsive = np.array([True] * 5 + [False] * 2)
    config = ClusteringConfig(method=method)
    labels, _ = cluster_filters(similarity, descriptors, config, keep=4, responsive=responsive)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2, 3])
    # Fewer clusters than unresponsive filters + 1: the count is still exact.
    labels, _ = cluster_filters(similarity, descriptors, config, keep=2, responsive=responsive)
    assert len(np.unique(labels)) == 2
    with pytest.raises(ValueError, match="one flag per filter"):
        cluster_filters(similarity, descriptors, config, keep=4, responsive=responsive[:3])


@pytest.mark.slow
def test_vmapped_images_equal_one_at_a_time_and_chunked(toy):
    model, variables, graph = toy
    together = np.asarray(maximization_images(model.apply, graph, variables, "conv1", SHAPE, FAST))
    chunked = np.asarray(
        maximization_images(
            model.apply, graph, variables, "conv1", SHAPE, dataclasses.replace(FAST, chunk_size=3)
        )
    )
    np.testing.assert_allclose(chunked, together, rtol=1e-5, atol=1e-5)
    for i in (0, 5):
        alone = maximization_images(
            model.apply, graph, variables, "conv1", SHAPE, FAST, filters=[i]
        )
        np.testing.assert_allclose(np.asarray(alone)[0], together[i], rtol=1e-5, atol=1e-5)


def test_images_are_determined_by_the_seed(toy):
    model, variables, graph = toy
    first = maximization_images(model.apply, graph, variables, "conv0", SHAPE, FAST)
    again = maximization_images(model.apply, graph, variables, "conv0", SHAPE, FAST)
    other = maximization_images(
        model.apply, graph, variables, "conv0", SHAPE, dataclasses.replace(FAST, seed=1)
    )
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_response_patterns_are_the_mean_activation_maps(toy):
    model, variables, graph = toy
    images = np.random.default_rng(0).normal(size=(5, *SHAPE)).astype(np.float32)
    patterns = response_patterns(model.apply, graph, variables, "conv0", images, batch_size=2)
    _, captured = gated_call(model.apply, graph, variables, jnp.asarray(images), capture=True)
    expected = np.moveaxis(np.asarray(captured["conv0"][0]).mean(axis=0), -1, 0)
    np.testing.assert_allclose(patterns, expected, rtol=1e-5, atol=1e-6)


def test_response_maps_are_the_gated_maps_in_batches(toy):
    model, variables, graph = toy
    images = np.random.default_rng(1).normal(size=(5, *SHAPE)).astype(np.float32)
    groups = [g.name for g in graph.groups if g.name.startswith("conv")]
    maps = response_maps(model.apply, graph, variables, groups, images, batch_size=2)
    _, captured = gated_call(model.apply, graph, variables, jnp.asarray(images), capture=True)
    for group in groups:
        np.testing.assert_allclose(maps[group], captured[group][0], rtol=1e-5, atol=1e-6)


def test_combined_descriptor_averages_image_and_response_similarity(hand_made):
    model, variables, graph = hand_made
    rng = np.random.default_rng(2)
    images = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    probes = rng.normal(size=(6, *SHAPE)).astype(np.float32)
    model_args = dict(apply_fn=model.apply, graph=graph, variables=variables, group="conv")
    responses = filter_descriptors(
        images, "responses", probes=probes, resolution=None, **model_args
    )
    # Filters 0 and 1 are the same kernel: identical (centred) responses.
    np.testing.assert_allclose(responses[0], responses[1], rtol=1e-6)
    np.testing.assert_allclose(responses.mean(axis=1), 0.0, atol=1e-9)
    both = filter_descriptors(
        images, "image+responses", probes=probes, resolution=None, **model_args
    )
    pixels = image_descriptors(images, "pixels")
    expected = (cosine_similarity(pixels) + np.corrcoef(responses)) / 2
    np.testing.assert_allclose(cosine_similarity(both), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="runs the model"):
        filter_descriptors(images, "responses")
    with pytest.raises(ValueError, match="descriptor must be one of"):
        filter_descriptors(images, "colour")


def test_bad_inputs_name_the_fix(toy):
    model, variables, graph = toy
    with pytest.raises(ValueError, match="batch axis"):
        maximization_images(model.apply, graph, variables, "conv0", (1, *SHAPE))
    with pytest.raises(ValueError, match="filters"):
        maximization_images(model.apply, graph, variables, "conv0", SHAPE, filters=[99])
    with pytest.raises(ValueError, match="steps"):
        maximization_images(
            model.apply, graph, variables, "conv0", SHAPE, VisualizationConfig(steps=0)
        )
    with pytest.raises(ValueError, match="k-means needs a target ratio"):
        check_config(FunctionalConfig(clustering=ClusteringConfig(method="kmeans")))
    with pytest.raises(ValueError, match="ratio"):
        check_config(FunctionalConfig(ratio=1.0))
    with pytest.raises(ValueError, match="representative"):
        check_config(FunctionalConfig(representative="median"))
    with pytest.raises(ValueError, match="normalization"):
        normalize_images(np.zeros((1, 2, 2, 1)), "zscore")
    # Config mistakes are caught before any image is made.
    for clustering_config, message in [
        (ClusteringConfig(descriptor="hog"), "descriptor"),
        (ClusteringConfig(normalization="zscore"), "normalization"),
        (ClusteringConfig(method="kmeans", kmeans_iterations=0), "kmeans_iterations"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_config(FunctionalConfig(ratio=0.5, clustering=clustering_config))
    with pytest.raises(ValueError, match="Unknown criterion 'taylr'"):
        check_config(FunctionalConfig(criterion="taylr"))
    check_config(FunctionalConfig(criterion="taylr", representative="centroid"))
    with pytest.raises(ValueError, match="batch_size"):
        check_config(FunctionalConfig(batch_size=0))


# ---------------------------------------------------------------------------------------------
# The method


@pytest.mark.parametrize(
    "config",
    [
        FunctionalConfig(ratio=0.5, visualization=FAST),
        FunctionalConfig(
            ratio=0.4,
            representative="centroid",
            clustering=ClusteringConfig(method="kmeans"),
            visualization=FAST,
        ),
        FunctionalConfig(clustering=ClusteringConfig(threshold=0.3), visualization=FAST),
    ],
    ids=["agglomerative-taylor", "kmeans-centroid", "threshold"],
)
@pytest.mark.slow
def test_pruned_model_equals_the_masked_model(toy, config):
    module, variables, graph = toy
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, *SHAPE)), jnp.float32)
    batch = {"image": x, "label": jnp.asarray(rng.integers(0, 5, 16), jnp.int32)}
    model = Model.linen(module, x[:1], variables=variables)
    result = functional_prune(model, variables, [batch], config, progress=False)
    records = {r["group"]: r for r in result.history}
    assert set(records) == {"conv0", "conv1"} == set(result.keep)
    images = layer_images(module.apply, graph, variables, ["conv0", "conv1"], SHAPE, FAST)
    scores = None
    if config.representative == "criterion":
        context = criteria.ScoringContext(module.apply, graph)
        scores = criteria.score(config.criterion, context, variables, [batch])
    layers = functional_layers(module.apply, graph, variables, images, scores, config)
    for name, layer in layers.items():
        n_clusters = len(np.unique(layer.labels))
        assert len(layer.keep) == n_clusters
        np.testing.assert_array_equal(
            layer.responsive,
            responsive_filters(module.apply, graph, variables, name, layer.images, FAST),
        )
        assert len(np.unique(layer.labels[layer.keep])) == n_clusters  # one per cluster
        if config.ratio is not None:
            assert n_clusters == kept_count(graph[name].size, config)
        # The method found the same clusters and representatives.
        assert records[name]["labels"] == layer.labels.tolist()
        assert records[name]["keep"] == layer.keep.tolist() == result.keep[name].tolist()
        assert records[name]["unresponsive"] == int(np.sum(~layer.responsive))
    masks = keep_to_masks(graph, result.keep)
    np.testing.assert_allclose(
        result.model(result.variables, x),  # the pruned program
        gated_call(module.apply, graph, variables, x, masks),
        rtol=1e-5,
        atol=1e-5,
    )
    assert result.summary["cost"]["after"]["flops"] < result.summary["cost"]["before"]["flops"]


@pytest.mark.parametrize("kind", ["responses", "image+responses"])
def test_response_descriptors_probe_with_every_layers_images(toy, kind):
    """The method's response descriptors: each layer's maps on the images of both conv layers
    (the probes), as `filter_descriptors` computes them from those probes."""
    module, variables, graph = toy
    config = FunctionalConfig(
        ratio=0.5,
        representative="centroid",
        clustering=ClusteringConfig(descriptor=kind, resolution=None),
        visualization=FAST,
    )
    images = layer_images(module.apply, graph, variables, ["conv0", "conv1"], SHAPE, FAST)
    layers = functional_layers(module.apply, graph, variables, images, None, config)
    probes = np.concatenate([images["conv0"], images["conv1"]])
    for name, layer in layers.items():
        expected = filter_descriptors(
            images[name], kind, apply_fn=module.apply, graph=graph, variables=variables,
            group=name, probes=probes, resolution=None,
        )  # fmt: skip
        np.testing.assert_allclose(layer.similarity, cosine_similarity(expected), atol=1e-6)
        assert len(np.unique(layer.labels)) == kept_count(graph[name].size, config)
    with pytest.raises(ValueError, match="descriptor must be one of"):
        FunctionalConfig(clustering=ClusteringConfig(descriptor="colour")).check()


def stored_steps(workdir) -> list[str]:
    images = workdir / "checkpoints" / "images"
    return sorted(p.name for p in images.iterdir() if p.name.isdigit())


def test_stored_images_resume_and_refuse_other_settings(toy, tmp_path, monkeypatch):
    model, variables, graph = toy
    whole = layer_images(model.apply, graph, variables, ["conv0", "conv1"], SHAPE, FAST)
    stored = layer_images(
        model.apply, graph, variables, ["conv0", "conv1"], SHAPE, FAST, workdir=tmp_path
    )
    assert stored_steps(tmp_path) == ["1", "2"]
    # As if killed after the first layer: only its checkpoint is left; the rerun resumes there.
    shutil.rmtree(tmp_path / "checkpoints" / "images" / "2")
    made = []
    original = functional.maximization_images
    monkeypatch.setattr(
        functional,
        "maximization_images",
        lambda *args, **kwargs: made.append(args[3]) or original(*args, **kwargs),
    )
    resumed = layer_images(
        model.apply, graph, variables, ["conv0", "conv1"], SHAPE, FAST, workdir=tmp_path
    )
    assert made == ["conv1"]
    for name in whole:
        np.testing.assert_array_equal(stored[name], whole[name])
        np.testing.assert_array_equal(resumed[name], whole[name])
    other_variables = jax.tree_util.tree_map(lambda v: v + 1.0, variables)
    with pytest.raises(RunMismatchError, match="variables"):
        layer_images(
            model.apply, graph, other_variables, ["conv0", "conv1"], SHAPE, FAST, workdir=tmp_path
        )
    with pytest.raises(RunMismatchError, match="visualization.steps: 12 -> 3"):
        layer_images(
            model.apply,
            graph,
            variables,
            ["conv0", "conv1"],
            SHAPE,
            dataclasses.replace(FAST, steps=3),
            workdir=tmp_path,
        )


def test_images_of_a_run_are_recomputed_when_damaged_or_not_theirs(toy, tmp_path, monkeypatch):
    model, variables, graph = toy
    groups = ["conv0", "conv1"]
    whole = layer_images(model.apply, graph, variables, groups, SHAPE, FAST)
    with RunDir.open(tmp_path, kind="functional", identity={}) as run:
        layer_images(model.apply, graph, variables, groups, SHAPE, FAST, run=run)
    # Damage the newest step's arrays: it is recomputed from the step before it.
    step = tmp_path / "checkpoints" / "images" / "2"
    for path in step.rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(b"\0" * path.stat().st_size)
    made = []
    original = functional.maximization_images
    monkeypatch.setattr(
        functional,
        "maximization_images",
        lambda *args, **kwargs: made.append(args[3]) or original(*args, **kwargs),
    )
    with RunDir.open(tmp_path, kind="functional", identity={}) as run:
        again = layer_images(model.apply, graph, variables, groups, SHAPE, FAST, run=run)
    assert made == ["conv1"]
    for name in whole:
        np.testing.assert_array_equal(again[name], whole[name])
    # Images of other variables in the same run directory are never reused: all recomputed.
    made.clear()
    other = jax.tree_util.tree_map(lambda v: v * 1.5, variables)
    with RunDir.open(tmp_path, kind="functional", identity={}) as run:
        layer_images(model.apply, graph, other, groups, SHAPE, FAST, run=run)
    assert made == groups


def test_a_layer_normalised_in_blocks_keeps_every_block_holding_a_representative():
    from jaxprune.methods.functional import _whole_blocks

    np.testing.assert_array_equal(_whole_blocks(np.array([1, 4]), 2), [0, 1, 4, 5])
    np.testing.assert_array_equal(_whole_blocks(np.array([1, 4]), 1), [1, 4])


class GlobalPooled(nn.Module):
    """The last conv is read after a global mean: its gate point holds (N, C) values."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), name="first")(x))
        x = nn.relu(nn.Conv(6, (3, 3), name="last")(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_responses_of_a_globally_pooled_conv_are_its_pooled_values():
    model = GlobalPooled()
    x = jnp.zeros((1, *SHAPE))
    variables = model.init(jax.random.key(1), x)
    graph = channel_graph(model.apply, variables, x)
    probes = np.random.default_rng(0).normal(size=(5, *SHAPE)).astype(np.float32)
    maps = response_maps(model.apply, graph, variables, ["last"], probes)["last"]
    assert maps.shape == (5, 1, 1, 6)

    def pooled(v, images):
        inner = nn.relu(nn.Conv(6, (3, 3)).apply(
            {"params": v["params"]["last"]},
            nn.relu(nn.Conv(4, (3, 3)).apply({"params": v["params"]["first"]}, images)),
        ))  # fmt: skip
        return jnp.mean(inner, axis=(1, 2))

    np.testing.assert_allclose(maps[:, 0, 0], pooled(variables, probes), rtol=1e-5, atol=1e-6)
