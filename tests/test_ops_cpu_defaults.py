"""The CPU defaults of `jaxprune.ops`: the XLA flag and the one-channel convolution lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxprune import ops
from jaxprune.ops import cpu, lowering

DN = ("NHWC", "HWIO", "NHWC")


def numpy_conv(x, w, padding):
    """The reference: NHWC x HWIO in float64, padding pairs may be negative (a crop)."""
    for axis, (low, high) in zip((1, 2), padding, strict=True):
        pad = [(0, 0)] * 4
        pad[axis] = (max(low, 0), max(high, 0))
        x = np.pad(x, pad)
        stop = x.shape[axis] + min(high, 0)
        x = np.take(x, np.arange(-min(low, 0), stop), axis=axis)
    kh, kw = w.shape[:2]
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", x[:, i : i + oh, j : j + ow], w[i, j])
    return out


def conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN)


@pytest.mark.parametrize(
    "kernel, padding, out",
    [((5, 5), "SAME", 6), ((3, 3), "VALID", 4), ((3, 3), ((2, 0), (-1, 1)), 3)],
)
@pytest.mark.slow
def test_one_channel_lowering_equals_the_stock_convolution_and_its_gradients(kernel, padding, out):
    assert lowering.use_single_channel_lowering()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 9, 8, 1)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel, 1, out)), jnp.float32)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], kernel, (1, 1), padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    expected = numpy_conv(np.asarray(x, np.float64), np.asarray(w, np.float64), padding)
    ours = jax.jit(conv, static_argnums=2)(x, w, padding)
    assert "convolution" not in jax.jit(conv, static_argnums=2).lower(x, w, padding).as_text()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_allclose(lowering.shifted_sum(x, w, padding), ours, atol=1e-5)

    def loss(x, w):
        return jnp.sum(jnp.sin(conv(x, w, padding)))

    def reference_loss(x, w):  # the same sum written with slices, no convolution anywhere
        return jnp.sum(jnp.sin(lowering.shifted_sum(x, w, padding)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    expected_grads = jax.grad(reference_loss, argnums=(0, 1))(x, w)
    for ours_g, ref_g in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(ours_g, ref_g, atol=1e-4)


def test_the_lowering_leaves_other_convolutions_alone():
    x1 = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 1, 4), jnp.float32)
    params = dict(
        dimension_numbers=lax.conv_dimension_numbers(x1.shape, w.shape, DN),
        window_strides=(1, 1),
        feature_group_count=1,
        batch_group_count=1,
    )
    assert lowering.handles(x1, w, **params)
    assert not lowering.handles(jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), w, **params)
    assert not lowering.handles(x1, w, **{**params, "window_strides": (2, 2)})
    assert not lowering.handles(x1, w, **{**params, "rhs_dilation": (2, 2)})
    big = jax.ShapeDtypeStruct((9, 9, 1, 4), jnp.float32)
    assert not lowering.handles(x1, big, **params)
    ints = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.int32)
    assert not lowering.handles(ints, jax.ShapeDtypeStruct((3, 3, 1, 4), jnp.int32), **params)


def test_use_cpu_defaults_respects_the_user_and_the_opt_out():
    assert not cpu.use_cpu_defaults({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=x"})
    env = {ops.OPT_OUT_ENV: "1"}
    assert not cpu.use_cpu_defaults(env) and "XLA_FLAGS" not in env
    # A backend runs in this test process, so the flag can no longer take effect here.
    jnp.zeros(())
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert not cpu.use_cpu_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_stock_options_bring_ynnpack_back_for_one_function():
    options = ops.stock_cpu_compiler_options("cpu")
    assert ops.stock_cpu_compiler_options("gpu") == {}
    if not options:
        pytest.skip("this jaxlib does not know the option")
    x, w = jnp.ones((4, 8, 8, 8)), jnp.ones((3, 3, 8, 8))
    text = jax.jit(conv, static_argnums=2, compiler_options=options).lower(x, w, "SAME")
    assert "ynn" in text.compile().as_text()
