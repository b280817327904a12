"""Taylor criteria: Eq. 8 and its variants against NumPy, per-example gradients, BN and weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_helpers import init
from toy_models import ConvBNDense, ResidualProjection

from jaxprune.criteria import ScoringContext, score, taylor
from jaxprune.gates import activations_and_gradients, gate_points, gated_call
from jaxprune.graph import channel_graph

X = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
Y = np.array([0, 1, 2, 0, 1, 2], np.int32)
BATCH = {"image": X, "label": Y}
SPLIT = [{"image": X[:2], "label": Y[:2]}, {"image": X[2:], "label": Y[2:]}]
VARIANTS = ("taylor", "taylor_abs_then_mean", "taylor_signed_sum")


def setup(model):
    variables = init(model, X)
    rng = np.random.default_rng(0)
    # Non-zero BatchNorm shifts, so their Taylor terms are not all zero.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            v + jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype)
            if p[-1].key in ("scale", "bias")
            else v
        ),
        variables["params"],
    )
    variables = {**variables, "params": params}
    return variables, ScoringContext(model.apply, channel_graph(model.apply, variables, X))


@pytest.fixture(scope="module")
def residual():
    return setup(ResidualProjection())


def summed_loss(output):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(output, jnp.asarray(Y)))


def mean_loss_of(context, variables, x, y, masks=None):
    out = gated_call(context.apply_fn, context.graph, variables, x, masks)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))


@pytest.mark.slow
def test_variants_place_the_absolute_value_as_documented(residual):
    variables, context = residual
    _, _, acts, grads = jax.jit(
        lambda v: activations_and_gradients(context.apply_fn, context.graph, v, X, summed_loss)
    )(variables)
    got = {name: score(name, context, variables, BATCH) for name in VARIANTS}
    for group in context.graph.names:
        # Per point: channels last, a * g summed over positions, divided by the number of
        # positions M of the group's first point (the spatial mean when there is one point).
        first = np.asarray(acts[group][0])
        m = float(np.prod(first.shape[1:-1]))
        terms = []
        abs_terms = []
        for a, g in zip(acts[group], grads[group], strict=True):
            prod = np.asarray(a, np.float64) * np.asarray(g, np.float64)
            axes = tuple(range(1, prod.ndim - 1))
            terms.append((prod.sum(axis=axes) if axes else prod) / m)
            abs_terms.append((np.abs(prod).sum(axis=axes) if axes else np.abs(prod)) / m)
        t = sum(terms)  # (examples, channels): summed over points before any |.|
        np.testing.assert_allclose(got["taylor"][group], np.abs(t).mean(0), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(
            got["taylor_abs_then_mean"][group], sum(abs_terms).mean(0), rtol=1e-4, atol=1e-9
        )
        np.testing.assert_allclose(
            got["taylor_signed_sum"][group], np.abs(t.mean(0)), rtol=1e-4, atol=1e-9
        )
    assert len(acts["b1_conv2"]) == 2  # the residual group really has two points


def test_signed_sum_is_the_first_order_change_of_the_mean_loss():
    # For a group with one gate point of M positions, d(mean loss)/d(mask_c) equals
    # M * (1/N) sum_n t[n, c]: an independent route to the same number.
    variables, context = setup(ConvBNDense())
    ones = {g.name: jnp.ones(g.size) for g in context.graph}
    mask_grad = jax.jit(jax.grad(lambda m: mean_loss_of(context, variables, X, jnp.asarray(Y), m)))(
        ones
    )
    got = score("taylor_signed_sum", context, variables, BATCH)
    positions = {"conv0": 8 * 8, "conv1": 4 * 4, "fc": 1}
    for group, m in positions.items():
        np.testing.assert_allclose(
            got[group], np.abs(np.asarray(mask_grad[group])) / m, rtol=1e-4, atol=1e-9
        )


class TwoScales(nn.Module):
    """A group read at two map sizes: by a strided conv at 8x8 and, pooled and added to that
    conv's output, by the next conv at 4x4."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.relu(nn.Conv(6, (3, 3), name="stem")(x))
        b = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), name="down")(a))
        y = nn.avg_pool(a, (2, 2), (2, 2)) + b
        z = nn.relu(nn.Conv(4, (3, 3), name="mix")(y))
        return nn.Dense(3, name="head")(z.reshape(z.shape[0], -1))


@pytest.mark.slow
def test_a_group_read_at_maps_of_two_sizes_gets_the_first_order_loss_change():
    # Removing channel c of "stem" everywhere changes the mean loss by -d(loss)/d(mask_c) to
    # first order; the signed Taylor score times the first point's positions (8 x 8) is that
    # derivative. Weighting each point by its own positions (a spatial mean per point) is not.
    variables, context = setup(TwoScales())
    points = gate_points(context.apply_fn, context.graph, variables, X)["stem"]
    assert sorted(p.shape[1] for p in points) == [4, 8]
    ones = {g.name: jnp.ones(g.size) for g in context.graph}
    mask_grad = jax.jit(jax.grad(lambda m: mean_loss_of(context, variables, X, jnp.asarray(Y), m)))(
        ones
    )
    got = score("taylor_signed_sum", context, variables, BATCH)
    np.testing.assert_allclose(
        got["stem"] * 64, np.abs(np.asarray(mask_grad["stem"])), rtol=1e-4, atol=1e-9
    )


@pytest.mark.slow
def test_gradient_rows_are_per_example(residual):
    # Eq. 8 averages |t[n, c]| over examples, which is additive over batches only if row n of
    # the gradient is example n's own (a sum, not a mean, of the per-example losses).
    variables, context = residual
    for name in VARIANTS:
        whole = score(name, context, variables, BATCH)
        singles = [
            score(name, context, variables, {"image": X[i : i + 1], "label": Y[i : i + 1]})
            for i in range(len(Y))
        ]
        split = score(name, context, variables, SPLIT)
        for group in whole:
            np.testing.assert_allclose(split[group], whole[group], rtol=1e-4, atol=1e-9)
            if name == "taylor":
                mean_of_singles = np.mean([s[group] for s in singles], axis=0)
                np.testing.assert_allclose(mean_of_singles, whole[group], rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_taylor_on_batch_norm_is_the_squared_sum_of_gradient_times_parameter(residual):
    variables, context = residual

    def param_grads(x, y):
        def loss(params):
            return mean_loss_of(context, {**variables, "params": params}, x, y)

        return jax.jit(jax.grad(loss))(variables["params"])

    p = variables["params"]
    bns = {"stem": ["stem_bn"], "b1_conv2": ["b1_bn2", "b1_bn_sc", "b2_bn2"]}
    for name, leaf in (("taylor_bn_gamma", "scale"), ("taylor_bn_beta", "bias")):
        per_batch = []
        for batch in SPLIT:
            g = param_grads(batch["image"], jnp.asarray(batch["label"]))
            per_batch.append(
                {
                    group: sum(
                        np.asarray(g[b][leaf], np.float64) * np.asarray(p[b][leaf], np.float64)
                        for b in layers
                    )
                    ** 2
                    for group, layers in bns.items()
                }
            )
        got = score(name, context, variables, SPLIT)
        for group in bns:
            want = (per_batch[0][group] + per_batch[1][group]) / 2  # averaged over batches
            np.testing.assert_allclose(got[group], want, rtol=1e-4, atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_taylor_on_weights_uses_the_gradient_of_the_mean_loss_over_all_data(residual):
    variables, context = residual
    grads = jax.jit(
        jax.grad(
            lambda params: mean_loss_of(context, {**variables, "params": params}, X, jnp.asarray(Y))
        )
    )(variables["params"])
    p = variables["params"]
    layers = ["b1_conv2", "b1_shortcut", "b2_conv2"]
    rows = np.stack(
        [
            np.concatenate(
                [
                    (np.asarray(p[layer]["kernel"]) * np.asarray(grads[layer]["kernel"]))[
                        ..., c
                    ].ravel()
                    for layer in layers
                ]
            )
            for c in range(8)
        ]
    )
    l1 = score("taylor_weight_l1", context, variables, SPLIT)["b1_conv2"]
    l2 = score("taylor_weight_l2", context, variables, BATCH)["b1_conv2"]
    np.testing.assert_allclose(l1, np.abs(rows).sum(1), rtol=1e-4)
    np.testing.assert_allclose(l2, np.sqrt((rows**2).sum(1)), rtol=1e-4)


@pytest.mark.slow
def test_masked_channels_have_zero_taylor_terms_and_score_minus_infinity(residual):
    variables, context = residual
    masks = {"b1_conv1": np.array([1, 1, 0, 1, 1, 1, 0], np.float32)}
    got = score("taylor", context, variables, BATCH, masks=masks)
    assert np.isneginf(got["b1_conv1"][[2, 6]]).all()
    assert np.isfinite(got["b1_conv1"][[0, 1, 3, 4, 5]]).all()


def test_unknown_variant_and_a_mean_loss_are_refused(residual):
    variables, context = residual
    with pytest.raises(ValueError, match="variant"):
        taylor(variant="mean")
    scalar = ScoringContext(
        context.apply_fn,
        context.graph,
        loss_fn=lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y).mean(),
    )
    with pytest.raises(ValueError, match="one loss per example"):
        score("taylor", scalar, variables, BATCH)
