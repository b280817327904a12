"""The oneDNN lowering of convolutions (`jaxprune.ops.onednn`): the three passes and a small
network against XLA's own convolution in float64, which the lowering never handles."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxprune.ops import lowering, onednn

DN = ("NHWC", "HWIO", "NHWC")
BUILT = onednn.available()
MIN_POSITIONS = onednn.settings["min_positions"]
needs_library = pytest.mark.skipif(
    not BUILT, reason=f"oneDNN library not built (run {onednn.BUILD_COMMAND})"
)


@pytest.fixture
def active():
    """The lowering, active for one test only: other tests keep XLA's convolutions."""
    assert onednn.use_onednn_lowering()
    # The test problems are small: every size goes to oneDNN.
    onednn.settings.update(active=True, min_positions=0)
    yield
    onednn.settings.update(active=False, min_positions=MIN_POSITIONS)


@pytest.fixture(scope="module", autouse=True)
def _inactive_after_module():
    yield
    onednn.settings["active"] = False


def close(actual, expected, rtol=1e-5):
    """Float32 against a float64 reference: errors relative to the reference's scale."""
    expected = np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * scale
    )


def targets(fn, *args):
    """The oneDNN targets that the compiled program of `fn` calls."""
    text = jax.jit(fn).lower(*args).as_text()
    return {kind for kind, name in onednn.TARGETS.items() if name in text}


# (input shape, kernel shape, strides, padding, rhs dilation, feature groups)
CASES = {
    "3x3 stride 1 same, batch 7, odd sizes": ((7, 9, 11, 4), (3, 3, 4, 6), (1, 1), "SAME", 1, 1),
    "3x3 stride 2 same, batch 1": ((1, 9, 9, 3), (3, 3, 3, 5), (2, 2), "SAME", 1, 1),
    "5x5 stride 2 valid": ((2, 10, 11, 3), (5, 5, 3, 4), (2, 2), "VALID", 1, 1),
    "5x5 asymmetric explicit padding": (
        (2, 11, 10, 4),
        (5, 5, 4, 6),
        (2, 1),
        ((2, 1), (0, 3)),
        1,
        1,
    ),
    "3x3 rhs dilation 2": ((7, 11, 9, 4), (3, 3, 4, 6), (1, 1), "SAME", 2, 1),
    "3x3 rhs dilation 2, stride 2": ((2, 13, 13, 4), (3, 3, 4, 6), (2, 2), "SAME", 2, 1),
    "depthwise 3x3 stride 2": ((7, 9, 9, 4), (3, 3, 1, 4), (2, 2), "SAME", 1, 4),
    "two groups 3x3": ((2, 9, 7, 4), (3, 3, 2, 6), (1, 1), "SAME", 1, 2),
    "1x1 stride 2 (shortcut)": ((7, 9, 9, 4), (1, 1, 4, 8), (2, 2), "VALID", 1, 1),
}


def make_conv(strides, padding, dilation, groups):
    def conv(x, w):
        return lax.conv_general_dilated(
            x,
            w,
            strides,
            padding,
            rhs_dilation=(dilation, dilation),
            dimension_numbers=DN,
            feature_group_count=groups,
        )

    return conv


def test_unavailable_library_keeps_the_stock_path():
    """Without the library (or with JAXPRUNE_ONEDNN=0) nothing is installed and the
    convolutions still compute; a fresh process, so the lowering of this one is not seen."""
    script = textwrap.dedent(
        """
        import os
        from pathlib import Path
        import jax, numpy as np
        from jax import lax
        from jaxprune.ops import onednn
        assert not onednn.available() and onednn.onednn_version() is None
        assert onednn.use_onednn_lowering() is False and not onednn.is_installed()
        x, w = np.ones((2, 5, 5, 3), np.float32), np.ones((3, 3, 3, 4), np.float32)
        f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert "jaxprune_onednn" not in jax.jit(f).lower(x, w).as_text()
        assert float(jax.jit(f)(x, w)[0, 2, 2, 0]) == 27.0
        os.environ["JAXPRUNE_ONEDNN"] = "0"
        assert not onednn.enabled_by_environment()
        print("ok")
        """
    )
    env = dict(os.environ, JAXPRUNE_ONEDNN_LIBRARY="/nonexistent/libjaxprune_onednn.so")
    env.pop("JAXPRUNE_ONEDNN", None)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_available_matches_the_built_library():
    assert BUILT == onednn.LIBRARY.exists()
    if BUILT:
        assert onednn.onednn_version().count(".") == 2
    else:
        assert onednn.use_onednn_lowering() is False


@needs_library
@pytest.mark.parametrize("chunks", [None, 1], ids=["sliced batch", "one call"])
@pytest.mark.parametrize("case", list(CASES))
def test_passes_match_float64(case, chunks, active):
    x_shape, w_shape, strides, padding, dilation, groups = CASES[case]
    rng = np.random.default_rng(len(case))
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    conv = make_conv(strides, padding, dilation, groups)
    out_shape = jax.eval_shape(conv, x, w).shape
    cotangent = rng.normal(size=out_shape).astype(np.float32)

    def passes(x, w, cotangent):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(cotangent))

    onednn.set_threads(1, chunks)
    try:
        y, dx, dw = jax.jit(passes)(x, w, cotangent)
    finally:
        onednn.set_threads()
    used = targets(passes, x, w, cotangent)
    strided = strides != (1, 1)
    assert used == {"forward", "backward_weights"} | ({"backward_data"} if strided else set())
    with jax.enable_x64(True):
        reference = passes(*(jnp.asarray(a, jnp.float64) for a in (x, w, cotangent)))
    for actual, expected in zip((y, dx, dw), reference, strict=True):
        close(actual, expected)


@needs_library
def test_jitted_value_and_grad_of_a_small_net(active):
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(3, 3, 3, 8)).astype(np.float32) * 0.3,
        "w2": rng.normal(size=(3, 3, 8, 8)).astype(np.float32) * 0.2,
        "w3": rng.normal(size=(3, 3, 1, 8)).astype(np.float32) * 0.3,
        "w4": rng.normal(size=(1, 1, 8, 4)).astype(np.float32) * 0.3,
    }
    x = rng.normal(size=(7, 11, 11, 3)).astype(np.float32)

    def loss(params, x):
        h = jnp.tanh(
            lax.conv_general_dilated(x, params["w1"], (1, 1), "SAME", dimension_numbers=DN)
        )
        h = jnp.tanh(
            lax.conv_general_dilated(h, params["w2"], (2, 2), "SAME", dimension_numbers=DN)
        )
        h = lax.conv_general_dilated(
            h, params["w3"], (1, 1), ((1, 0), (2, 1)), dimension_numbers=DN, feature_group_count=8
        )
        h = lax.conv_general_dilated(h, params["w4"], (1, 1), "VALID", dimension_numbers=DN)
        return jnp.mean(jnp.square(h - 0.1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
    assert targets(jax.value_and_grad(loss), params, x) == set(onednn.TARGETS)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        ref_value, ref_grads = jax.value_and_grad(loss)(params64, jnp.asarray(x, jnp.float64))
    close(value, ref_value)
    for name in params:
        close(grads[name], ref_grads[name])


@needs_library
def test_fallbacks_match_and_skip_onednn(active):
    """Cases the lowering leaves to XLA compile without a oneDNN call and still match."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    nchw = lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    x_nchw, w_oihw = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    half = lambda x, w: make_conv((1, 1), "SAME", 1, 1)(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    )
    big_pad = make_conv((1, 1), ((4, 4), (0, 0)), 1, 1)  # padding beyond the kernel's reach
    lhs_dilated = lambda x, w: lax.conv_general_dilated(
        x, w, (2, 2), ((1, 1), (1, 1)), lhs_dilation=(2, 2), dimension_numbers=DN
    )
    cases = [
        (nchw, (x_nchw, w_oihw), 1e-5),
        (half, (x, w), 2e-2),
        (big_pad, (x, w), 1e-5),
        (lhs_dilated, (x, w), 1e-5),
    ]
    for fn, args, rtol in cases:
        assert targets(fn, *args) == set()
        with jax.enable_x64(True):
            expected = fn(*(jnp.asarray(a, jnp.float64) for a in args))
        close(np.asarray(jax.jit(fn)(*args), np.float64), expected, rtol)


@needs_library
def test_one_input_channel_keeps_the_shifted_sum(active):
    """The single-channel lowering stays in front: its forward is not a oneDNN call."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 9, 9, 1)).astype(np.float32)
    w = rng.normal(size=(3, 3, 1, 6)).astype(np.float32)
    conv = make_conv((1, 1), "SAME", 1, 1)
    assert lowering.handles(
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(w.shape, w.dtype),
        dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, DN),
        window_strides=(1, 1),
        feature_group_count=1,
        batch_group_count=1,
    )
    expected = "forward" if "previous" not in lowering._installed else None
    assert targets(conv, x, w) == ({expected} if expected else set())
    with jax.enable_x64(True):
        reference = conv(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64))
    close(jax.jit(conv)(x, w), reference)


@needs_library
def test_plan_reads_the_gradient_patterns():
    """The weight gradient's strides and dilation come back swapped; the input gradient's
    padding is the forward one again."""
    x = jax.ShapeDtypeStruct((2, 9, 9, 4), np.float32)
    w = jax.ShapeDtypeStruct((3, 3, 4, 6), np.float32)
    conv = make_conv((2, 2), "SAME", 1, 1)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: conv(x, w).sum(), (0, 1)))(x, w)
    plans = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            avals = [v.aval for v in (*eqn.invars, *eqn.outvars)]
            kind, problem, reverse = onednn.plan(*avals, **eqn.params)
            plans[kind] = (problem, reverse)
    assert set(plans) == set(onednn.TARGETS)
    for kind, (problem, reverse) in plans.items():
        # n, ic, ih, iw, oc, oh, ow, kh, kw, groups, strides, dilation, padding (low, high)
        assert list(problem[:18]) == [2, 4, 9, 9, 6, 5, 5, 3, 3, 1, 2, 2, 0, 0, 1, 1, 1, 1], kind
        assert reverse == (kind == "backward_data")


@needs_library
def test_an_evicted_primitive_is_made_again_with_the_same_result(active):
    """With room for one primitive, shapes that take turns evict each other every call; the
    results stay those of the full cache."""
    rng = np.random.default_rng(7)
    conv = make_conv((1, 1), "SAME", 1, 1)
    inputs = [
        (rng.normal(size=(3, 8, 8, c)).astype(np.float32),
         rng.normal(size=(3, 3, c, 5)).astype(np.float32))
        for c in (2, 3, 4)
    ]  # fmt: skip
    step = jax.jit(lambda x, w: jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), (0, 1))(x, w))
    kept = [step(x, w) for x, w in inputs]
    assert onednn.set_cache_capacity(1)
    try:
        for _ in range(2):
            for (x, w), expected in zip(inputs, kept, strict=True):
                for a, b in zip(step(x, w), expected, strict=True):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        onednn.set_cache_capacity()


@needs_library
def test_an_exported_program_keeps_xlas_convolution(active):
    """jax.export serialises a program for other machines: no call into this library, and the
    reloaded program computes what the live one does."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    conv = make_conv((2, 2), "SAME", 1, 1)
    assert targets(conv, x, w) == {"forward"}  # live: oneDNN
    exported = jax.export.export(jax.jit(conv))(x, w)
    assert "jaxprune_onednn" not in exported.mlir_module()
    reloaded = jax.export.deserialize(exported.serialize())
    close(reloaded.call(x, w), np.asarray(jax.jit(conv)(x, w), np.float64))


@needs_library
def test_small_convolutions_stay_with_xla(active):
    """Below `min_positions` output positions a convolution (and its gradients) keeps XLA's
    lowering: a oneDNN call's fixed cost outweighs its kernel there."""
    x = np.ones((1, 8, 8, 3), np.float32)
    w = np.ones((3, 3, 3, 4), np.float32)
    conv = make_conv((1, 1), "SAME", 1, 1)
    # (a fresh function each time: a lowering is cached per function and shapes)
    assert targets(lambda *a: conv(*a), x, w) == {"forward"}  # 64 positions, threshold 0
    onednn.settings["min_positions"] = 65
    assert targets(lambda *a: conv(*a), x, w) == set()
    assert targets(lambda *a: conv(*a), np.ones((2, 8, 8, 3), np.float32), w) == {"forward"}
