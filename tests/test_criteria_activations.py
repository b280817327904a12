"""Activation criteria: the reductions against NumPy, batch accumulation, several gate points."""

import jax
import numpy as np
import pytest
from core_helpers import init
from toy_models import ConvBNDense, ResidualProjection, TwoBranchConcat

from jaxprune.criteria import ScoringContext, entropy, score
from jaxprune.gates import gated_call
from jaxprune.graph import channel_graph

X = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
Y = np.array([0, 1, 2, 0, 1, 1, 4, 3], np.int32)
NAMES = ("activation_mean", "activation_std", "apoz", "entropy", "hrank", "mutual_info")
BINS = 4


def setup(model):
    variables = init(model, X)
    return variables, ScoringContext(model.apply, channel_graph(model.apply, variables, X))


@pytest.fixture(scope="module")
def conv_bn_dense():
    return setup(ConvBNDense())


def captured(context, variables, x, masks=None):
    _, acts = gated_call(context.apply_fn, context.graph, variables, x, masks, capture=True)
    return {name: [np.asarray(a, np.float64) for a in values] for name, values in acts.items()}


def entropy_of_counts(counts):
    p = counts[counts > 0] / counts.sum()
    return -np.sum(p * np.log(p))


def numpy_scores(act, labels):
    """The formulas, for one gate point with channels last, written without the library."""
    n, c = act.shape[0], act.shape[-1]
    flat = act.reshape(-1, c)
    pooled = act.reshape(n, -1, c).mean(1)
    out = {
        "activation_mean": flat.mean(0),
        "activation_std": flat.std(0),
        "apoz": 1 - (flat == 0).mean(0),
        "hrank": None,
        "entropy": np.zeros(c),
        "mutual_info": np.zeros(c),
    }
    if act.ndim == 4:
        out["hrank"] = np.array(
            [np.mean([np.linalg.matrix_rank(act[i, :, :, k]) for i in range(n)]) for k in range(c)]
        )
    for k in range(c):
        edges = np.linspace(pooled[:, k].min(), pooled[:, k].max(), BINS + 1)
        if edges[0] == edges[-1]:
            continue  # a constant channel: entropy and information 0
        q = np.clip(np.digitize(pooled[:, k], edges[1:-1]), 0, BINS - 1)
        out["entropy"][k] = entropy_of_counts(np.bincount(q, minlength=BINS))
        joint = np.array([q[i] * 100 + labels[i] for i in range(n)])
        out["mutual_info"][k] = (
            entropy_of_counts(np.bincount(q))
            + entropy_of_counts(np.bincount(labels))
            - entropy_of_counts(np.unique(joint, return_counts=True)[1])
        )
    return out


def scores_of(context, variables, batches, masks=None):
    return {
        name: score(
            name,
            context,
            variables,
            batches,
            masks=masks,
            **({"bins": BINS} if name in ("entropy", "mutual_info") else {}),
        )
        for name in NAMES
    }


@pytest.mark.slow
def test_conv_bn_relu_activation_computed_by_hand(conv_bn_dense):
    variables, context = conv_bn_dense
    x = np.asarray(X, np.float64)
    kernel = np.asarray(variables["params"]["conv0"]["kernel"], np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(
        np.einsum("nhwc,co->nhwo", padded[:, i : i + 8, j : j + 8, :], kernel[i, j])
        for i in range(3)
        for j in range(3)
    )
    bn, stats = variables["params"]["bn0"], variables["batch_stats"]["bn0"]
    normed = (conv - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
    act = np.maximum(normed, 0)
    batch = {"image": X, "label": Y}
    np.testing.assert_allclose(
        score("activation_mean", context, variables, batch)["conv0"],
        act.mean(axis=(0, 1, 2)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        score("apoz", context, variables, batch)["conv0"], 1 - (act == 0).mean(axis=(0, 1, 2))
    )


def test_every_activation_criterion_matches_numpy(conv_bn_dense):
    variables, context = conv_bn_dense
    acts = captured(context, variables, X)
    got = scores_of(context, variables, [{"image": X, "label": Y}])
    for group in context.graph.names:
        (act,) = acts[group]
        want = numpy_scores(act, Y)
        for name in NAMES:
            if want[name] is None:
                assert group not in got[name], (name, group)  # HRank needs 2-D maps
                continue
            np.testing.assert_allclose(
                got[name][group], want[name], rtol=1e-5, atol=1e-6, err_msg=f"{name} {group}"
            )


def test_batches_accumulate_to_the_scores_of_one_big_batch(conv_bn_dense):
    variables, context = conv_bn_dense
    whole = scores_of(context, variables, {"image": X, "label": Y})
    split = scores_of(
        context,
        variables,
        [{"image": X[:3], "label": Y[:3]}, {"image": X[3:], "label": Y[3:]}],
    )
    for name in NAMES:
        for group in whole[name]:
            np.testing.assert_allclose(
                split[name][group], whole[name][group], rtol=1e-5, atol=1e-6, err_msg=name
            )


@pytest.mark.slow
def test_several_gate_points_are_averaged():
    variables, context = setup(ResidualProjection())
    acts = captured(context, variables, X)
    points = acts["b1_conv2"]
    assert [p.ndim for p in points] == [4, 2]  # after block 1, and pooled for the head
    got = scores_of(context, variables, {"image": X, "label": Y})
    per_point = [numpy_scores(p, Y) for p in points]
    for name in ("activation_mean", "activation_std", "apoz", "entropy", "mutual_info"):
        np.testing.assert_allclose(
            got[name]["b1_conv2"],
            (per_point[0][name] + per_point[1][name]) / 2,
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )
    # HRank reads only the point that has (H, W) maps.
    np.testing.assert_allclose(got["hrank"]["b1_conv2"], per_point[0]["hrank"])


@pytest.mark.slow
def test_interleaved_channels_are_gathered_per_channel():
    variables, context = setup(TwoBranchConcat())
    (point_a, point_mixed) = context.graph.gate_points["branch_a"]
    assert point_mixed.channel_of_index is not None
    owner = point_mixed.channel_of_index
    first, mixed = captured(context, variables, X)["branch_a"]
    gathered = np.stack([mixed[..., np.flatnonzero(owner == c)[0]] for c in range(5)], -1)
    want = (first.mean(axis=(0, 1, 2)) + gathered.mean(axis=(0, 1, 2))) / 2
    got = score("activation_mean", context, variables, {"image": X, "label": Y})["branch_a"]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_masked_channels_score_minus_infinity_and_the_rest_see_the_masked_model(conv_bn_dense):
    variables, context = conv_bn_dense
    masks = {"conv0": np.array([1, 0, 1, 1, 0, 1], np.float32)}
    got = score("activation_mean", context, variables, {"image": X, "label": Y}, masks=masks)
    assert np.isneginf(got["conv0"][[1, 4]]).all()
    (act,) = captured(context, variables, X, masks)["conv1"]
    np.testing.assert_allclose(got["conv1"], act.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(
        got["conv0"][[0, 2, 3, 5]],
        captured(context, variables, X, masks)["conv0"][0].mean(axis=(0, 1, 2))[[0, 2, 3, 5]],
        rtol=1e-5,
    )


def test_bins_must_be_an_integer_of_at_least_two():
    with pytest.raises(ValueError, match="bins"):
        entropy(bins=1)


def test_a_conv_followed_by_pooling_is_read_after_the_pooling():
    """The documented read point: VGG-small's conv2/4/6 feed a max-pool, and their activation
    statistics are of the pooled maps (the gate sits where the next layer reads)."""
    from jaxprune.models import build_model

    model = build_model("vgg_small", 10)
    x = np.zeros((2, 28, 28, 1), np.float32)
    variables = model.init(jax.random.key(0), x, train=False)

    def apply(v, images):
        return model.apply(v, images, train=False)

    context = ScoringContext(apply, channel_graph(apply, variables, x))
    maps = captured(context, variables, x)
    spatial = {name: maps[name][0].shape[1:3] for name in maps if name.startswith("conv")}
    assert spatial == {
        "conv1": (28, 28), "conv2": (14, 14), "conv3": (14, 14),
        "conv4": (7, 7), "conv5": (7, 7), "conv6": (3, 3),
    }  # fmt: skip
