"""Tests of the model zoo: shapes, call conventions, width-spec round trips, sizes and errors."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import MODELS, build_model, default_widths, widths_from_params

NAMES = ("lenet5", "vgg_small", "vgg16_bn", "vgg16", "resnet20", "resnet56")
BN_MODELS = ("vgg_small", "vgg16_bn", "resnet20", "resnet56")


def _abstract_variables(model: nn.Module, shape: tuple[int, ...]):
    """Initialises shapes only: no compute, so even VGG-16 at 224x224 is instant."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))


def _random_variables(model: nn.Module, shape: tuple[int, ...], seed: int = 0):
    """He-normal kernels, zero biases, BatchNorm at its initial state, filled in by NumPy.

    Compiling `model.init` costs seconds per model on a small CPU (it traces every initialiser);
    only the forward pass is under test here, so the variables are made without it.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        return jnp.ones(leaf.shape) if name in ("scale", "var") else jnp.zeros(leaf.shape)

    abstract = _abstract_variables(model, shape)
    return jax.tree_util.tree_map_with_path(fill, abstract)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _narrower_spec(model: nn.Module, seed: int) -> dict[str, int]:
    """A random spec with every layer but the head strictly narrower, couplings respected."""
    rng = np.random.default_rng(seed)
    defaults = model.default_widths()
    spec = dict(defaults)
    grouped = [list(group) for group in model.coupled_widths()]
    in_group = {path for group in grouped for path in group}
    grouped += [[path] for path in defaults if path not in in_group and path != "head"]
    for group in grouped:
        width = int(rng.integers(1, min(defaults[path] for path in group)))
        spec.update({path: width for path in group})
    return spec


def _tiny_spec(name: str, num_classes: int) -> dict[str, int]:
    """At most 4 channels per layer, so the large models run in milliseconds."""
    spec = {path: min(4, width) for path, width in default_widths(name, num_classes).items()}
    spec["head"] = num_classes
    return spec


# ---------------------------------------------------------------- widths_from_params (generic)


def test_widths_from_params_reads_any_tree():
    params = {
        "encoder": {
            "conv": {"kernel": np.zeros((3, 3, 2, 7)), "bias": np.zeros(7)},
            "norm": {"scale": np.zeros(7), "bias": np.zeros(7)},
        },
        "fc": {"kernel": jax.ShapeDtypeStruct((7, 5), jnp.float32)},
    }
    assert widths_from_params(params) == {"encoder/conv": 7, "fc": 5}
    bare = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    assert widths_from_params(bare) == {"": 3}


def test_widths_from_params_unboxes_partitioned_params():
    init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    params = nn.Dense(6, kernel_init=init).init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    assert isinstance(params["kernel"], nn.Partitioned)
    assert widths_from_params({"proj": params}) == {"proj": 6}


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3), (1, 224, 224, 3)])
def test_output_shape_for_every_input_size(name, shape):
    model = build_model(name, num_classes=7)
    variables = _abstract_variables(model, shape)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros(shape))
    chex.assert_shape(logits, (shape[0], 7))
    assert logits.dtype == jnp.float32
    expected_collections = {"params", "batch_stats"} if name in BN_MODELS else {"params"}
    assert set(variables) == expected_collections


def test_rank_3_input_is_refused():
    model = build_model("lenet5", 10)
    with pytest.raises(ValueError, match="NHWC"):
        model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))


# ---------------------------------------------------------------- width-spec round trips


@pytest.mark.parametrize("name", NAMES)
def test_default_spec_round_trip(name):
    model = build_model(name, num_classes=10)
    params = _abstract_variables(model, (1, 32, 32, 3))["params"]
    spec = widths_from_params(params)
    assert spec == default_widths(name, 10) == model.default_widths()
    assert spec["head"] == 10


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_narrower_spec_round_trip(name, seed):
    defaults = default_widths(name, 10)
    spec = _narrower_spec(build_model(name, 10), seed)
    assert all(spec[p] < defaults[p] for p in defaults if p != "head")
    model = build_model(name, 10, widths=spec)
    params = _abstract_variables(model, (1, 32, 32, 3))["params"]
    assert widths_from_params(params) == spec
    # The spec read back from params rebuilds the same module.
    assert build_model(name, 10, widths=widths_from_params(params)) == model


def test_narrower_spec_runs_for_real():
    spec = _narrower_spec(build_model("resnet20", 10), seed=3)
    model = build_model("resnet20", 10, widths=spec)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = _random_variables(model, x.shape)
    # One compiled program; op-by-op execution would compile every odd-shaped op separately.
    logits = jax.jit(model.apply)(variables, x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    assert widths_from_params(variables["params"]) == spec


def test_partial_spec_keeps_other_defaults():
    model = build_model("vgg_small", 10, widths={"conv2": 5})
    assert model.full_widths() == {**default_widths("vgg_small", 10), "conv2": 5}


def test_resnet_layer_paths_and_couplings():
    spec = default_widths("resnet20", 10)
    assert "stage2/block0/shortcut" in spec and "stage3/block0/shortcut" in spec
    assert "stage1/block0/shortcut" not in spec  # identity: the shape is kept
    assert "stage2/block1/shortcut" not in spec
    groups = build_model("resnet20", 10).coupled_widths()
    assert groups == (
        ("stem", "stage1/block0/conv2", "stage1/block1/conv2", "stage1/block2/conv2"),
        ("stage2/block0/shortcut",) + tuple(f"stage2/block{b}/conv2" for b in range(3)),
        ("stage3/block0/shortcut",) + tuple(f"stage3/block{b}/conv2" for b in range(3)),
    )
    variables = _abstract_variables(build_model("resnet20", 10), (1, 32, 32, 3))
    block = variables["params"]["stage2"]["block0"]
    assert set(block) == {"conv1", "bn1", "conv2", "bn2", "shortcut", "shortcut_bn"}
    assert block["shortcut"]["kernel"].shape == (1, 1, 16, 32)


def test_module_is_hashable_and_spec_order_does_not_matter():
    spec = default_widths("resnet20", 10)
    reordered = dict(reversed(list(spec.items())))
    a, b = build_model("resnet20", 10, widths=spec), build_model("resnet20", 10, widths=reordered)
    assert isinstance(a.widths, tuple)
    assert a == b and hash(a) == hash(b)


# ---------------------------------------------------------------- call conventions


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_call_conventions(name):
    num_classes = 3
    model = build_model(name, num_classes, widths=_tiny_spec(name, num_classes))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _random_variables(model, x.shape)

    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_shape(logits, (2, num_classes))
    chex.assert_trees_all_close(logits, jax.jit(model.apply)(variables, x))  # eval is the default

    train = lambda v, x, key: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
    )
    train_logits, updates = jax.jit(train)(variables, x, jax.random.key(2))
    chex.assert_shape(train_logits, (2, num_classes))
    chex.assert_tree_all_finite(train_logits)
    if name in BN_MODELS:
        assert set(updates) == {"batch_stats"}
        chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
        # Batch statistics moved away from the initial (0, 1).
        assert not np.allclose(
            updates["batch_stats"]["bn1" if "vgg" in name else "stem_bn"]["mean"], 0
        )
    else:
        assert updates == {} and isinstance(updates, dict)


@pytest.mark.slow
def test_lenet_real_init_and_train_mode_changes_nothing():
    model = build_model("lenet5", 10)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes(variables, _abstract_variables(model, x.shape))
    train = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    train_logits, updates = jax.jit(train)(variables, x)
    assert updates == {}
    chex.assert_trees_all_close(train_logits, jax.jit(model.apply)(variables, x), rtol=1e-6)


def test_dropout_only_in_train_mode():
    model = build_model("vgg_small", 10, widths={"conv1": 4, "conv2": 4, "fc1": 64})
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    variables = _random_variables(model, x.shape)

    @jax.jit
    def train(key):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})

    same_a, same_b, other = (
        train(jax.random.key(5)),
        train(jax.random.key(5)),
        train(jax.random.key(6)),
    )
    chex.assert_trees_all_equal(same_a, same_b)
    assert not np.allclose(same_a[0], other[0])
    # Eval needs no dropout rng and is deterministic.
    evaluate = jax.jit(model.apply)
    chex.assert_trees_all_equal(evaluate(variables, x), evaluate(variables, x))


def test_batchnorm_momentum_and_epsilon_match_numpy():
    model = build_model("vgg_small", 10, widths={"conv1": 3})
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    variables = _random_variables(model, x.shape)
    is_conv1_or_bn1 = lambda module, _: module.name in ("conv1", "bn1")

    def run(variables, train):
        return model.apply(
            variables,
            x,
            train=train,
            mutable=["batch_stats", "intermediates"],
            rngs={"dropout": jax.random.key(2)},
            capture_intermediates=is_conv1_or_bn1,
        )

    run = jax.jit(run, static_argnums=1)
    _, state = run(variables, True)
    conv1 = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    stats = state["batch_stats"]["bn1"]
    # Running averages start at (0, 1) and move by (1 - momentum) = 0.1 toward the batch's.
    np.testing.assert_allclose(stats["mean"], 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(
        stats["var"], 0.9 + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )

    # Eval normalises with the running averages and epsilon 1e-5 (which dominates a tiny var).
    running = {"mean": jnp.full(3, 0.25), "var": jnp.full(3, 1e-5)}
    batch_stats = {**variables["batch_stats"], "bn1": running}
    _, state = run({**variables, "batch_stats": batch_stats}, False)
    chex.assert_trees_all_equal(state["batch_stats"], batch_stats)  # eval leaves them alone
    conv1 = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    bn1 = state["intermediates"]["bn1"]["__call__"][0]
    np.testing.assert_allclose(bn1, (conv1 - 0.25) / np.sqrt(2e-5), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", BN_MODELS)
def test_every_conv_is_followed_by_configured_batchnorm(name):
    model = build_model(name, 10)
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Conv | nn.BatchNorm):
            seen.append(context.module)
        return next_fun(*args, **kwargs)

    variables = _abstract_variables(model, (1, 32, 32, 3))
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((1, 32, 32, 3)))
    convs = [m for m in seen if isinstance(m, nn.Conv)]
    norms = [m for m in seen if isinstance(m, nn.BatchNorm)]
    assert len(convs) == len(norms) > 0
    assert all(not conv.use_bias for conv in convs)
    assert {(bn.momentum, bn.epsilon) for bn in norms} == {(0.9, 1e-5)}


def test_convs_before_batchnorm_have_no_bias():
    params = _abstract_variables(build_model("resnet20", 10), (1, 32, 32, 3))["params"]
    assert "bias" not in params["stem"] and "bias" not in params["stage3"]["block0"]["shortcut"]
    assert "bias" in params["head"]
    vgg = _abstract_variables(build_model("vgg16", 10), (1, 32, 32, 3))["params"]
    assert "bias" in vgg["conv1"]  # no BatchNorm, so the conv keeps its bias
    vgg_bn = _abstract_variables(build_model("vgg16_bn", 10), (1, 32, 32, 3))["params"]
    assert "bias" not in vgg_bn["conv1"] and "scale" in vgg_bn["bn1"]


# ---------------------------------------------------------------- sizes


def _macs_per_image(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Counts multiply-accumulates of every Conv and Dense from their output and kernel shapes."""
    variables = _abstract_variables(model, shape)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(
            v,
            x,
            mutable=["intermediates"],
            capture_intermediates=lambda m, _: isinstance(m, nn.Conv | nn.Dense),
        ),
        variables,
        jnp.zeros(shape),
    )
    outputs = jax.tree_util.tree_leaves_with_path(state["intermediates"])
    kernels = {
        tuple(k.key for k in path[:-1]): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel"
    }
    total = 0
    for path, out in outputs:
        module = tuple(k.key for k in path[:-2])  # drop "__call__" and the tuple index
        total += math.prod(out.shape[1:-1]) * math.prod(kernels[module])
    assert len(outputs) == len(kernels)
    return total


def test_vgg_small_macs_by_hand():
    # (output side, in, out) of the six 3x3 convs; the pools take 28 -> 14 -> 7 -> 3.
    convs = [(28, 1, 32), (28, 32, 32), (14, 32, 64), (14, 64, 64), (7, 64, 128), (7, 128, 128)]
    by_hand = sum(side * side * 9 * cin * cout for side, cin, cout in convs)
    by_hand += 3 * 3 * 128 * 512 + 512 * 10
    assert by_hand == 29_722_112
    assert _macs_per_image(build_model("vgg_small", 10), (1, 28, 28, 1)) == by_hand


def test_resnet56_size_by_hand():
    model = build_model("resnet56", 10)
    conv3 = lambda cin, cout: 9 * cin * cout
    bn = lambda c: 2 * c  # scale and bias; running stats are not params
    blocks = 9
    by_hand = conv3(3, 16) + bn(16)
    by_hand += blocks * (2 * conv3(16, 16) + 2 * bn(16))
    for cin, cout in [(16, 32), (32, 64)]:
        by_hand += conv3(cin, cout) + conv3(cout, cout) + 2 * bn(cout)  # first block
        by_hand += cin * cout + bn(cout)  # its 1x1 projection shortcut
        by_hand += (blocks - 1) * (2 * conv3(cout, cout) + 2 * bn(cout))
    by_hand += 64 * 10 + 10
    assert by_hand == 855_770
    variables = _abstract_variables(model, (1, 32, 32, 3))
    assert _count(variables["params"]) == by_hand
    macs = _macs_per_image(model, (1, 32, 32, 3))
    assert macs == 125_747_840 and abs(macs - 125e6) < 1e6


def test_vgg16_imagenet_size():
    model = build_model("vgg16", 1000)
    params = _abstract_variables(model, (1, 224, 224, 3))["params"]
    assert _count(params) == 138_357_544
    assert round(_macs_per_image(model, (1, 224, 224, 3)) / 1e9, 2) == 15.47


# ---------------------------------------------------------------- errors


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet18'") as error:
        build_model("resnet18", 10)
    assert all(name in str(error.value) for name in MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        default_widths("vgg19", 10)


def test_unknown_width_key_is_refused_with_a_suggestion():
    with pytest.raises(
        ValueError, match=r"'stage1/block0/cnv1' \(did you mean 'stage1/block0/conv1'"
    ):
        build_model("resnet20", 10, widths={"stage1/block0/cnv1": 8})
    with pytest.raises(ValueError, match="unknown layer"):
        build_model("lenet5", 10, widths={"conv3": 8})


@pytest.mark.parametrize(
    "name, widths, message",
    [
        ("lenet5", {"conv1": 0}, "at least 1"),
        ("lenet5", {"conv1": 2.0}, "positive int"),
        ("vgg_small", {"head": 11}, "fixed"),
        ("resnet20", {"stage1/block1/conv2": 8}, "coupling"),
        ("resnet20", {"stage2/block0/shortcut": 8}, "coupling"),
    ],
)
def test_bad_width_values_are_refused(name, widths, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, 10, widths=widths)


def test_bad_num_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", 0)


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        MODELS["mine"] = build_model  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [("lenet5", (2, 28, 28, 1)), ("resnet20", (2, 16, 16, 3))])
def test_conv_impl_switch_changes_speed_not_results(name, shape):
    from jaxprune.models.random_init import random_variables

    x = jax.random.normal(jax.random.key(0), shape)
    stock = build_model(name, 10, conv_impl="xla")
    variables = random_variables(stock, x)

    def loss(model, params):
        out = model.apply({**variables, "params": params}, x, train=False)
        return jnp.sum(out**2)

    for impl in ("auto", "gemm"):
        other = build_model(name, 10, conv_impl=impl)
        np.testing.assert_allclose(
            other.apply(variables, x), stock.apply(variables, x), rtol=1e-5, atol=1e-5
        )
        grads = jax.grad(lambda p, m=other: loss(m, p))(variables["params"])
        expected = jax.grad(lambda p: loss(stock, p))(variables["params"])
        chex.assert_trees_all_close(grads, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises((ValueError, KeyError)):
        build_model(name, 10, conv_impl="fastest").apply(variables, x)


def test_rebuild_fn_builds_zoo_models_and_passes_callables_through():
    from jaxprune.models import rebuild_fn

    rebuild = rebuild_fn("lenet5", 10)
    variables = build_model("lenet5", 10, {"conv1": 4}).init(
        jax.random.key(0), jnp.zeros((1, 28, 28, 1))
    )
    assert rebuild({"conv1": 4})(variables, jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
    own = lambda widths: None  # noqa: E731
    assert rebuild_fn(own, 10) is own
    with pytest.raises(ValueError, match="Unknown zoo model 'nope'"):
        rebuild_fn("nope", 10)
    with pytest.raises(ValueError, match="zoo model name or a callable"):
        rebuild_fn(3, 10)
