"""Tests of jaxprune.ops: the GEMM-gradient convolution, the implementation switch, the
reshape max-pool and the malloc settings.

Every numerical test compares against the stock JAX/flax operation and its autodiff on small
shapes; float32 results agree to rounding (the products are summed in another order).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen import pooling
from jax import lax

from jaxprune import ops
from jaxprune.graph import channel_graph
from jaxprune.ops import conv_general_dilated_gemm, conv_impl, is_handled

NHWC = ("NHWC", "HWIO", "NHWC")
ATOL = 2e-5  # float32, sums of <= 5*5*3*2*9*9 products of O(1) values


def _random(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _value_and_grads(conv_fn, x, w, *args, **kwargs):
    """The conv output and (dL/dx, dL/dw) for a fixed random output gradient."""
    y, vjp = jax.vjp(lambda x, w: conv_fn(x, w, *args, **kwargs), x, w)
    dy = _random(np.random.default_rng(1), y.shape).astype(y.dtype)
    return y, vjp(dy)


def _assert_same_as_stock(x, w, *args, atol=ATOL, **kwargs):
    expected = _value_and_grads(lax.conv_general_dilated, x, w, *args, **kwargs)
    actual = _value_and_grads(conv_general_dilated_gemm, x, w, *args, **kwargs)
    chex.assert_trees_all_equal_shapes(actual, expected)
    chex.assert_trees_all_close(actual, expected, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# conv_general_dilated_gemm: values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 1), (0, 3))])
def test_matches_stock_conv_and_its_gradients(kernel, stride, padding):
    rng = np.random.default_rng(kernel * 10 + stride)
    # Odd, non-square sizes so strided windows leave rows and columns unread.
    x, w = _random(rng, (2, 9, 10, 3)), _random(rng, (kernel, kernel, 3, 4))
    assert is_handled(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    _assert_same_as_stock(x, w, (stride, stride), padding, dimension_numbers=NHWC)


def test_matches_stock_with_unequal_strides_and_negative_padding():
    rng = np.random.default_rng(3)
    x, w = _random(rng, (2, 11, 8, 2)), _random(rng, (3, 2, 2, 5))
    padding = ((-1, 2), (1, 0))  # a negative pad crops the input
    assert is_handled(x, w, (2, 1), padding, dimension_numbers=NHWC)
    _assert_same_as_stock(x, w, (2, 1), padding, dimension_numbers=NHWC)


def test_matches_stock_with_flax_dimension_numbers_object():
    rng = np.random.default_rng(4)
    x, w = _random(rng, (1, 6, 6, 2)), _random(rng, (3, 3, 2, 3))
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)  # what flax passes
    assert is_handled(x, w, (1, 1), "SAME", dimension_numbers=numbers)
    _assert_same_as_stock(x, w, (1, 1), "SAME", dimension_numbers=numbers)


def test_bfloat16_is_handled_and_close_to_stock():
    rng = np.random.default_rng(5)
    x = _random(rng, (2, 8, 8, 4)).astype(jnp.bfloat16)
    w = _random(rng, (3, 3, 4, 4)).astype(jnp.bfloat16)
    assert is_handled(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    actual = _value_and_grads(
        conv_general_dilated_gemm, x, w, (1, 1), "SAME", dimension_numbers=NHWC
    )
    expected = _value_and_grads(
        lax.conv_general_dilated, x, w, (1, 1), "SAME", dimension_numbers=NHWC
    )
    assert jax.tree.map(lambda a: a.dtype, actual) == jax.tree.map(lambda a: a.dtype, expected)
    # bfloat16 keeps 8 bits of mantissa: compare at its resolution, relative to the scale.
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.max(np.abs(a - e)) <= 0.05 * np.max(np.abs(e))


def test_weight_gradient_matches_a_numpy_sum_over_output_positions():
    # A non-square kernel and unequal strides pin the im2col row order (kh, kw, c_in).
    rng = np.random.default_rng(11)
    x, w = _random(rng, (2, 7, 8, 3)), _random(rng, (2, 3, 3, 5))
    strides, pads = (2, 1), ((1, 0), (1, 1))
    y, vjp = jax.vjp(
        lambda w: conv_general_dilated_gemm(x, w, strides, pads, dimension_numbers=NHWC), w
    )
    dy = np.asarray(_random(np.random.default_rng(1), y.shape), np.float64)
    x_pad = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = y.shape[1:3]
    expected = np.zeros(w.shape)
    for kh in range(w.shape[0]):
        for kw in range(w.shape[1]):
            taps = x_pad[:, kh : kh + 2 * out_h : 2, kw : kw + out_w, :]  # (N, OH, OW, C_in)
            expected[kh, kw] = np.einsum("nijc,nijo->co", taps, dy)
    np.testing.assert_allclose(vjp(jnp.asarray(dy, jnp.float32))[0], expected, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    ["depthwise", "groups", "kernel_dilation", "input_dilation", "nchw", "one_d", "f32_output"],
)
def test_unhandled_cases_fall_back_to_the_stock_op(case):
    rng = np.random.default_rng(6)
    x, w = _random(rng, (2, 7, 7, 4)), _random(rng, (3, 3, 4, 6))
    kwargs = {"dimension_numbers": NHWC}
    padding = "SAME"
    if case == "depthwise":
        w = _random(rng, (3, 3, 1, 4))
        kwargs["feature_group_count"] = 4
    elif case == "groups":
        w = _random(rng, (3, 3, 2, 6))
        kwargs["feature_group_count"] = 2
    elif case == "kernel_dilation":
        kwargs["rhs_dilation"] = (2, 2)
    elif case == "input_dilation":
        kwargs["lhs_dilation"] = (2, 1)
        padding = ((1, 1), (1, 1))  # lax refuses string padding for dilated inputs
    elif case == "nchw":
        x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
        kwargs = {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}
    elif case == "one_d":
        x, w = x[:, 0], w[0]
        kwargs = {"dimension_numbers": ("NWC", "WIO", "NWC")}
    elif case == "f32_output":
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        kwargs["preferred_element_type"] = jnp.float32
    strides = (1,) * (x.ndim - 2)
    assert not is_handled(x, w, strides, padding, **kwargs)
    # The fallback is the stock op itself: same program, so bit-identical results ...
    expected = _value_and_grads(lax.conv_general_dilated, x, w, strides, padding, **kwargs)
    actual = _value_and_grads(conv_general_dilated_gemm, x, w, strides, padding, **kwargs)
    chex.assert_trees_all_equal(actual, expected)
    # ... and no custom rule in the traced program.
    jaxpr = jax.make_jaxpr(lambda x, w: conv_general_dilated_gemm(x, w, strides, padding, **kwargs))
    assert "custom_vjp" not in str(jaxpr(x, w))


def test_handled_case_uses_the_custom_rule():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    jaxpr = jax.make_jaxpr(
        lambda x, w: conv_general_dilated_gemm(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    )(x, w)
    assert "custom_vjp_call" in str(jaxpr)


def test_forward_mode_differentiation_raises():
    # The documented limit of a custom_vjp: jvp is refused instead of silently wrong.
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    f = lambda x: conv_general_dilated_gemm(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (x,), (x,))


def test_jit_and_vmap_match_stock():
    rng = np.random.default_rng(7)
    x, w = _random(rng, (3, 8, 8, 2)), _random(rng, (3, 3, 2, 4))

    def per_example_weight_grads(conv_fn):
        def loss(w, image):
            y = conv_fn(image[None], w, (2, 2), "SAME", dimension_numbers=NHWC)
            return jnp.sum(jnp.tanh(y))

        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, x)

    actual = per_example_weight_grads(conv_general_dilated_gemm)
    expected = per_example_weight_grads(lax.conv_general_dilated)
    chex.assert_shape(actual, (3, 3, 3, 2, 4))
    chex.assert_trees_all_close(actual, expected, atol=ATOL, rtol=1e-5)


def test_deterministic():
    rng = np.random.default_rng(8)
    x, w = _random(rng, (2, 9, 9, 3)), _random(rng, (3, 3, 3, 4))
    grad = jax.jit(
        jax.grad(
            lambda w: jnp.sum(
                conv_general_dilated_gemm(x, w, (1, 1), "SAME", dimension_numbers=NHWC) ** 2
            )
        )
    )
    chex.assert_trees_all_equal(grad(w), grad(w))


# ---------------------------------------------------------------------------------------------
# In flax models
# ---------------------------------------------------------------------------------------------


class _TinyNet(nn.Module):
    """conv(bias) - relu - strided conv(no bias) - BN - relu - depthwise conv - pool - dense."""

    conv: str

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = conv_impl(self.conv)
        x = nn.relu(nn.Conv(6, (3, 3), conv_general_dilated=conv, name="c1")(x))
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False, conv_general_dilated=conv, name="c2")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        x = nn.Conv(8, (3, 3), feature_group_count=8, conv_general_dilated=conv, name="dw")(x)
        x = ops.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def _train(conv: str, steps: int = 3):
    rng = np.random.default_rng(9)
    images, labels = _random(rng, (4, 12, 12, 2)), jnp.asarray([0, 1, 2, 1])
    model = _TinyNet(conv)
    variables = model.init(jax.random.key(0), images, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats}, images, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    losses = []
    for _ in range(steps):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    return params, stats, losses


@pytest.mark.slow
def test_model_trains_to_the_same_params_as_stock():
    params, stats, losses = _train("gemm")
    stock_params, stock_stats, stock_losses = _train("xla")
    assert losses[-1] < losses[0]  # it does train
    chex.assert_trees_all_close(params, stock_params, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(stats, stock_stats, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(losses, stock_losses, rtol=1e-5)


def test_channel_graph_is_the_same_with_the_gemm_conv():
    x = jnp.zeros((2, 12, 12, 2))
    variables = _TinyNet("xla").init(jax.random.key(0), x, train=False)

    def groups(conv):
        graph = channel_graph(_TinyNet(conv).apply, variables, x, train=False)
        return sorted((g.name, g.size, tuple(sorted(g.producers))) for g in graph.groups)

    assert groups("gemm") == groups("xla")
    assert len(groups("xla")) >= 2


# ---------------------------------------------------------------------------------------------
# conv_impl
# ---------------------------------------------------------------------------------------------


def test_conv_impl_names():
    assert conv_impl("xla") is lax.conv_general_dilated
    assert conv_impl("gemm") is conv_general_dilated_gemm
    assert set(ops.CONV_IMPLS) == {"xla", "gemm"}
    for platform in ("cpu", "gpu", "tpu", "cuda"):
        assert ops.default_conv_impl(platform) in ops.CONV_IMPLS
        assert (
            conv_impl("auto", platform=platform) is ops.CONV_IMPLS[ops.default_conv_impl(platform)]
        )
    # GPUs and TPUs keep XLA's own convolutions.
    assert ops.default_conv_impl("gpu") == ops.default_conv_impl("tpu") == "xla"
    assert conv_impl() is conv_impl("auto", platform=jax.default_backend())


@pytest.mark.parametrize("name", ["cudnn", "", None, "XLA"])
def test_conv_impl_refuses_unknown_names(name):
    with pytest.raises(ValueError, match="unknown conv implementation"):
        conv_impl(name)


# ---------------------------------------------------------------------------------------------
# max_pool
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, window, strides, padding",
    [
        ((2, 8, 6, 3), (2, 2), (2, 2), "VALID"),  # tiles: reshape form
        ((2, 8, 6, 3), (2, 2), (2, 2), "SAME"),  # tiles, so SAME adds nothing
        ((2, 9, 9, 3), (3, 3), (3, 3), ((0, 0), (0, 0))),
        ((8, 6, 3), (2, 2), (2, 2), "VALID"),  # no batch axis, as flax allows
        ((2, 3, 8, 6, 3), (2, 2), (2, 2), "VALID"),  # two batch axes
        ((2, 7, 7, 3), (2, 2), (2, 2), "VALID"),  # 7 is not a multiple of 2: stock
        ((2, 7, 7, 3), (2, 2), (2, 2), "SAME"),  # padded windows: stock
        ((2, 8, 8, 3), (2, 2), None, "VALID"),  # flax's default stride 1 overlaps: stock
        ((2, 8, 8, 3), (3, 3), (2, 2), "VALID"),  # overlapping windows: stock
    ],
)
@pytest.mark.slow
def test_max_pool_matches_flax(shape, window, strides, padding):
    x = _random(np.random.default_rng(10), shape)  # continuous values: no ties

    def pooled_and_grad(pool):
        def loss(x):
            return jnp.sum(jnp.sin(pool(x, window, strides=strides, padding=padding)))

        return pool(x, window, strides=strides, padding=padding), jax.grad(loss)(x)

    chex.assert_trees_all_equal(pooled_and_grad(ops.max_pool), pooled_and_grad(pooling.max_pool))


def test_max_pool_uses_the_reshape_form_only_for_exact_tilings():
    def primitives(shape, strides):
        fn = lambda x: ops.max_pool(x, (2, 2), strides=strides)
        jaxpr = jax.make_jaxpr(fn)(jnp.zeros(shape))
        return {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}

    assert "reduce_window_max" not in primitives((1, 8, 8, 2), (2, 2))
    assert "reduce_max" in primitives((1, 8, 8, 2), (2, 2))
    assert "reduce_window_max" in primitives((1, 7, 7, 2), (2, 2))


def test_max_pool_ties_share_the_gradient():
    x = jnp.zeros((1, 2, 2, 1))
    grad = jax.grad(lambda x: ops.max_pool(x, (2, 2), strides=(2, 2)).sum())(x)
    np.testing.assert_allclose(np.asarray(grad).ravel(), [0.25] * 4)
    # Behind a ReLU, tied zeros get no gradient at all, as with the stock op.
    z = jnp.asarray([-1.0, -2.0, -0.5, -3.0]).reshape(1, 2, 2, 1)
    for pool in (ops.max_pool, pooling.max_pool):
        g = jax.grad(lambda z, pool=pool: pool(nn.relu(z), (2, 2), strides=(2, 2)).sum())(z)
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_max_pool_refuses_inputs_without_a_feature_axis():
    with pytest.raises(ValueError, match="rank >= 3"):
        ops.max_pool(jnp.zeros((4, 4)), (2, 2), strides=(2, 2))


# ---------------------------------------------------------------------------------------------
# malloc settings
# ---------------------------------------------------------------------------------------------


def test_tuned_environ_adds_the_tunables_and_keeps_the_users():
    env = ops.tuned_environ({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["GLIBC_TUNABLES"] == ops.GLIBC_TUNABLES
    assert ops.has_tuned_malloc(env) and not ops.has_tuned_malloc({"PATH": "/bin"})

    mine = "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0"
    env = ops.tuned_environ({"GLIBC_TUNABLES": mine})
    items = env["GLIBC_TUNABLES"].split(":")
    assert items[:2] == mine.split(":")  # the user's settings stay, first and unchanged
    assert "glibc.malloc.arena_max=1" not in items  # ... and are not overridden
    assert "glibc.malloc.hugetlb=1" in items and "glibc.malloc.mmap_max=0" in items
    assert len({item.split("=")[0] for item in items}) == len(items)


def test_cpu_compiler_options_are_accepted_and_only_for_cpu():
    assert ops.cpu_compiler_options("gpu") == {} and ops.cpu_compiler_options("tpu") == {}
    options = ops.cpu_compiler_options("cpu")
    assert isinstance(options, dict)
    # Whatever this jaxlib supports, the options compile and change no result.
    x, w = _random(np.random.default_rng(11), (2, 6, 6, 3)), jnp.ones((3, 3, 3, 2))
    f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    chex.assert_trees_all_close(
        jax.jit(f, compiler_options=options)(x, w), jax.jit(f)(x, w), atol=1e-5
    )
