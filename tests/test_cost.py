"""Tests of jaxprune.cost: counts against hand computations and published figures."""

from __future__ import annotations

import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import cost


class TinyNet(nn.Module):
    """conv with bias, strided conv, depthwise conv, BatchNorm, flatten, dense."""

    widths: tuple[int, int] = (4, 6)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c1, c2 = self.widths
        x = nn.relu(nn.Conv(c1, (3, 3), padding="SAME", dtype=self.dtype, name="conv1")(x))
        x = nn.Conv(c2, (3, 3), strides=2, padding="SAME", dtype=self.dtype, name="down")(x)
        depthwise = nn.Conv(c2, (3, 3), feature_group_count=c2, use_bias=False, name="dw")
        x = depthwise(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(5, name="fc")(x)


def _init(model: nn.Module, shape: tuple[int, ...]) -> tuple[dict, jax.Array]:
    x = jnp.ones(shape, jnp.float32)
    return model.init(jax.random.key(0), x), x


def _tiny_expected() -> dict[str, tuple[int, int, int]]:
    """(MACs, FLOPs, params) per layer of TinyNet on 8x8x3 inputs, by hand.

    conv1: 8x8 out, 3->4, 3x3, bias.    MACs 64*4*3*9,  FLOPs 2*64*(3*9+1)*4, params 3*9*4+4
    down:  4x4 out (stride 2), 4->6.    MACs 16*6*4*9,  FLOPs 2*16*(4*9+1)*6, params 4*9*6+6
    dw:    4x4 out, 6 groups of 1->1.   MACs 16*6*1*9,  FLOPs 2*16*(1*9+1)*6, params 9*6
    fc:    96 -> 5.                     MACs 96*5,      FLOPs (2*96-1)*5,     params 96*5+5
    """
    return {
        "conv1": (6912, 14336, 112),
        "down": (3456, 7104, 222),
        "dw": (864, 1920, 54),
        "fc": (480, 955, 485),
    }


@pytest.mark.slow
def test_tiny_model_matches_hand_counts():
    variables, x = _init(TinyNet(), (2, 8, 8, 3))
    report = cost.count(TinyNet().apply, variables, x)

    expected = _tiny_expected()
    assert [r.name for r in report.layers] == list(expected)
    for name, (macs, flops, params) in expected.items():
        row = report.layer(name)
        assert (row.macs, row.flops, row.params) == (macs, flops, params), name
    assert report.macs == sum(m for m, _, _ in expected.values()) == 11712
    assert report.flops == sum(f for _, f, _ in expected.values()) == 24315
    # Layer params plus BatchNorm's scale and bias (6 + 6); its running statistics do not count.
    assert report.params == 112 + 222 + 54 + 485 + 12


def test_tiny_model_geometry():
    variables, x = _init(TinyNet(), (2, 8, 8, 3))
    report = cost.count(TinyNet().apply, variables, x)

    conv1, down, dw, fc = report.layers
    assert (conv1.kind, conv1.in_channels, conv1.out_channels) == ("conv", 3, 4)
    assert (conv1.kernel_size, conv1.groups, conv1.out_spatial) == ((3, 3), 1, (8, 8))
    assert conv1.kernel_path == "params/conv1/kernel" and conv1.bias_path == "params/conv1/bias"
    assert down.out_spatial == (4, 4)
    assert (dw.in_channels, dw.out_channels, dw.groups, dw.bias_path) == (6, 6, 6, None)
    assert (fc.kind, fc.in_channels, fc.out_channels, fc.kernel_size) == ("dense", 96, 5, ())
    assert fc.bias_path == "params/fc/bias"


def test_counts_are_per_example_and_need_only_shapes():
    model = TinyNet()
    reports = []
    for batch in (1, 3):
        variables, x = _init(model, (batch, 8, 8, 3))
        reports.append(cost.count(model.apply, variables, x))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((4, 8, 8, 3)))
    x_shape = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
    reports.append(cost.count(model.apply, shapes, x_shape))

    first = reports[0].to_dict()
    for other in reports[1:]:
        other_dict = other.to_dict()
        assert other_dict.pop("input_shape")[1:] == first["input_shape"][1:]
        assert other_dict == {k: v for k, v in first.items() if k != "input_shape"}


def test_low_precision_layers_keep_their_names_and_biases():
    # A bf16 layer reads its f32 kernel and bias through convert_element_type.
    variables, x = _init(TinyNet(dtype=jnp.bfloat16), (2, 8, 8, 3))
    report = cost.count(TinyNet(dtype=jnp.bfloat16).apply, variables, x)
    assert [r.name for r in report.layers] == list(_tiny_expected())
    assert report.layer("conv1").bias_path == "params/conv1/bias"
    assert report.layer("down").params == 222


def test_plain_function_model():
    """A model written without flax: transposed dense kernel, a fixed filter, shared weights."""

    def apply_fn(weights, x):
        blur = jnp.ones((3, 3, 1, 1), jnp.float32) / 9.0  # no parameter: an unnamed layer
        x = jax.lax.conv_general_dilated(
            x, blur, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = x.reshape((x.shape[0], -1))  # (N, 36)
        h = x @ weights["proj"]["w"].T + weights["proj"]["b"]  # w stored (out, in) = (7, 36)
        h = h @ weights["shared"] @ weights["shared"]  # one (7, 7) matrix used twice
        return h * jnp.sum(h * h)  # a product of activations is no layer

    weights = {
        "proj": {"w": jnp.ones((7, 36)), "b": jnp.zeros((7,))},
        "shared": jnp.eye(7),
    }
    report = cost.count(apply_fn, weights, jnp.ones((2, 8, 8, 1)))

    assert [r.name for r in report.layers] == ["<conv 0>", "proj/w", "shared", "shared#2"]
    blur, proj, shared, shared2 = report.layers
    assert (blur.macs, blur.kernel_path, blur.out_spatial) == (36 * 9, None, (6, 6))
    assert blur.params == 0  # a fixed filter is no parameter
    assert (proj.in_channels, proj.out_channels, proj.macs) == (36, 7, 252)
    assert proj.bias_path == "proj/b" and proj.params == 7 * 36 + 7
    assert shared.macs == shared2.macs == 49
    assert shared.flops == (2 * 7 - 1) * 7
    # No collections: every leaf is a parameter.
    assert report.params == 7 * 36 + 7 + 49


def test_report_serialises_and_prints():
    variables, x = _init(TinyNet(), (2, 8, 8, 3))
    report = cost.count(TinyNet().apply, variables, x)

    restored = json.loads(json.dumps(report.to_dict()))
    assert restored["macs"] == report.macs and restored["params"] == report.params
    assert [row["name"] for row in restored["layers"]] == ["conv1", "down", "dw", "fc"]
    assert restored["layers"][0]["kernel_size"] == [3, 3]

    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split()[0] == "layer"
    assert [line.split()[0] for line in lines[1:5]] == ["conv1", "down", "dw", "fc"]
    assert lines[5].split()[0] == "total" and "11.71 K" in lines[5]
    with pytest.raises(KeyError, match="conv1, down, dw, fc"):
        report.layer("conv9")


@pytest.mark.slow
def test_narrower_model_costs_less_in_proportion():
    wide_vars, x = _init(TinyNet(widths=(8, 12)), (1, 8, 8, 3))
    narrow_vars, _ = _init(TinyNet(widths=(4, 6)), (1, 8, 8, 3))
    wide = cost.count(TinyNet(widths=(8, 12)).apply, wide_vars, x)
    narrow = cost.count(TinyNet(widths=(4, 6)).apply, narrow_vars, x)

    # MACs scale with (C_in / groups) * C_out: halving widths halves the first conv (its input
    # is the image), quarters the inner conv, halves the depthwise conv (C_in / groups stays 1)
    # and halves the dense layer (its output is the fixed number of classes).
    expected_ratio = {"conv1": 2, "down": 4, "dw": 2, "fc": 2}
    for w, n in zip(wide.layers, narrow.layers, strict=True):
        assert w.name == n.name
        assert w.macs == expected_ratio[w.name] * n.macs, w.name
    assert narrow.macs < wide.macs and narrow.params < wide.params

    table = cost.compare(wide, narrow)
    assert "8->12" in table and "4->6" in table
    down_line = next(line for line in table.splitlines() if line.startswith("down"))
    assert down_line.endswith("4.00x")
    total_line = next(line for line in table.splitlines() if line.startswith("total MACs"))
    assert total_line.endswith(f"{wide.macs / narrow.macs:.2f}x")


def test_compare_marks_layers_present_on_one_side():
    variables, x = _init(TinyNet(), (1, 8, 8, 3))
    report = cost.count(TinyNet().apply, variables, x)
    fewer = cost.CostReport(
        layers=report.layers[:-1],
        macs=report.macs,
        flops=report.flops,
        params=report.params,
        input_shape=report.input_shape,
    )
    fc_line = next(line for line in cost.compare(report, fewer).splitlines() if "fc" in line)
    assert fc_line.split()[2] == "-"


def test_zoo_lenet5_narrowed_costs_less_in_proportion():
    from jaxprune.models import build_model

    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    reports = {}
    for label, widths in (("wide", None), ("narrow", {"conv1": 3, "conv2": 8, "fc1": 60})):
        model = build_model("lenet5", num_classes=10, widths=widths)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x.shape))
        reports[label] = cost.count(model.apply, shapes, x, train=False)
    ratios = {
        w.name: w.macs / n.macs
        for w, n in zip(reports["wide"].layers, reports["narrow"].layers, strict=True)
    }
    assert ratios == {"conv1": 2.0, "conv2": 4.0, "fc1": 4.0, "fc2": 2.0, "head": 1.0}


def _zoo_report(name: str, num_classes: int, image: tuple[int, int, int]) -> cost.CostReport:
    from jaxprune.models import build_model

    model = build_model(name, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, *image), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x.shape))
    return cost.count(model.apply, shapes, x, train=False)


def test_vgg16_published_figures():
    report = _zoo_report("vgg16", 1000, (224, 224, 3))
    # Molchanov et al. 2017 give 30.96 GFLOPs; the usual figures are 15.47 GMACs, 138.36 M.
    assert report.macs / 1e9 == pytest.approx(15.47, abs=0.01)
    assert report.flops / 1e9 == pytest.approx(30.96, abs=0.01)
    assert round(report.params / 1e6, 2) == 138.36
    assert report.macs == 15_470_264_320
    assert [r.kind for r in report.layers].count("conv") == 13
    assert [r.kind for r in report.layers].count("dense") == 3


def test_resnet56_figures():
    report = _zoo_report("resnet56", 10, (32, 32, 3))
    # The published 125.49 M MACs / 0.853 M params are for parameter-free (option A) shortcuts.
    # The zoo projects with a 1x1 conv + BN at the two stage changes: 16->32 channels at 16x16
    # and 32->64 at 8x8, 131,072 MACs each, and 512 + 2,048 kernel + 64 + 128 BN parameters.
    assert report.macs == 125_485_696 + 2 * 131_072
    assert report.params == 853_018 + 512 + 2048 + 64 + 128
    assert report.macs / 1e6 == pytest.approx(125, abs=1)
    assert report.params / 1e6 == pytest.approx(0.85, abs=0.01)
    assert sum(r.kind == "conv" for r in report.layers) == 57


def test_latency_is_positive_and_ordered():
    variables, x = _init(TinyNet(), (2, 8, 8, 3))
    timing = cost.latency(TinyNet().apply, variables, x, warmup=1, repeats=5)
    assert len(timing.times) == 5 and timing.batch_size == 2
    assert math.isfinite(timing.median) and timing.median > 0
    assert timing.p10 <= timing.median <= timing.p90
    chex.assert_trees_all_close(timing.median, float(np.median(timing.times)))


def test_bad_input_is_refused():
    variables, x = _init(TinyNet(), (1, 8, 8, 3))
    with pytest.raises(ValueError, match="leading batch axis"):
        cost.count(lambda v, inp: inp * 2.0, {}, jnp.float32(1.0))
    shapes = jax.eval_shape(lambda: variables)
    with pytest.raises(ValueError, match="ShapeDtypeStruct"):
        cost.latency(TinyNet().apply, shapes, x)
    with pytest.raises(ValueError, match="repeats >= 1"):
        cost.latency(TinyNet().apply, variables, x, repeats=0)


@pytest.mark.slow
def test_channel_cost_is_what_removing_one_channel_saves():
    from jaxprune.graph import channel_graph

    variables, x = _init(TinyNet(), (2, 8, 8, 3))
    graph = channel_graph(TinyNet().apply, variables, x)
    report = cost.count(TinyNet().apply, variables, x)
    # MACs are linear in every width: one channel less saves exactly its cost.
    for name, narrower in (("conv1", (3, 6)), ("down", (4, 5))):
        small, _ = _init(TinyNet(widths=narrower), (2, 8, 8, 3))
        saved = report.macs - cost.count(TinyNet(widths=narrower).apply, small, x).macs
        assert cost.channel_cost(report, graph[name], "macs") == pytest.approx(saved), name
    # FLOPs: the same shares (a consumer's bias add is shared out over its inputs).
    flops = {r.name: r.flops for r in report.layers}
    expected = flops["conv1"] / 4 + flops["down"] / 4
    assert cost.channel_cost(report, graph["conv1"]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="'flops' or 'macs'"):
        cost.channel_cost(report, graph["conv1"], "params")
