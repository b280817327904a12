"""Iterative pruning (Molchanov et al. 2017): selection, stopping, shrinks, resume, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zlib
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from kill_resume import kill_and_resume
from toy_models import ConvBNDense

from jaxprune import checkpoint, data, train
from jaxprune.cli import load_config
from jaxprune.commands import prune as prune_command
from jaxprune.methods.iterative import (
    IterativeConfig,
    check_config,
    choose_removals,
    iterative_prune,
    make_network,
    rank_scores,
    remove_channels,
    shrink,
)
from jaxprune.model import Model
from jaxprune.models import build_model, widths_from_params

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
LENET = REPO_ROOT / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


@pytest.fixture(scope="module")
def lenet():
    _, variables, _ = checkpoint.load_model_file(LENET)
    return variables


@pytest.fixture(scope="module")
def tiny_data():
    return data.load(
        data.DataConfig(train_examples=320, validation_examples=128, test_examples=128)
    )


def small_config(**changes) -> IterativeConfig:
    values = dict(
        criterion="taylor",
        channels_per_step=2,
        updates_per_step=2,
        target_flops=0.6,
        shrink_every=0,
        batch_size=32,
        eval_batch_size=64,
        test_at_end=False,
    )
    return IterativeConfig(**{**values, **changes})


# ---------------------------------------------------------------------------------------------
# Ranking and selection against NumPy references


def reference_removals(ranked, masks, groups, count, min_channels):
    """Removes the global minimum one channel at a time, among groups above their minimum."""
    alive = {g: np.asarray(masks[g]) != 0 for g in groups}
    chosen = []
    for _ in range(count):
        best = None
        for order, g in enumerate(groups):
            if alive[g].sum() <= min_channels:
                continue
            for c in np.nonzero(alive[g])[0]:
                key = (ranked[g][c], order, c)
                if best is None or key < best[0]:
                    best = (key, g, int(c))
        if best is None:
            break
        chosen.append((best[1], best[2]))
        alive[best[1]][best[2]] = False
    return chosen


def test_choose_removals_takes_the_k_lowest_over_all_groups():
    rng = np.random.default_rng(0)
    sizes = {"a": 5, "b": 9, "c": 3}
    for trial in range(30):
        # Ties (rounded scores) and masked channels included.
        ranked = {g: np.round(rng.random(n), 1) for g, n in sizes.items()}
        masks = {g: (rng.random(n) > 0.3).astype(np.float32) for g, n in sizes.items()}
        for g in sizes:
            masks[g][0] = 1.0  # every group alive
            ranked[g][masks[g] == 0] = -np.inf
        count, min_channels = int(rng.integers(1, 12)), int(rng.integers(1, 3))
        got = choose_removals(ranked, masks, list(sizes), count, min_channels=min_channels)
        assert got == reference_removals(ranked, masks, list(sizes), count, min_channels), trial


def test_choose_removals_never_empties_a_group():
    ranked = {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([5.0, 6.0])}
    masks = {"a": np.ones(3), "b": np.ones(2)}
    got = choose_removals(ranked, masks, ["a", "b"], 100)
    assert got == [("a", 0), ("a", 1), ("b", 0)]  # one channel of each group survives
    with pytest.raises(ValueError, match="never empty"):
        choose_removals(ranked, masks, ["a"], 1, min_channels=0)
    with pytest.raises(ValueError, match="NaN"):
        choose_removals({"a": np.array([np.nan, 1, 2])}, masks, ["a"], 1)
    new = remove_channels(masks, got)
    np.testing.assert_array_equal(new["a"], [0, 0, 1])
    np.testing.assert_array_equal(masks["a"], [1, 1, 1])  # the input is not changed
    with pytest.raises(ValueError, match="already removed"):
        remove_channels(new, [("a", 0)])


def test_rank_scores_normalises_per_layer_then_regularises():
    scores = {"a": np.array([3.0, 4.0, 100.0]), "b": np.array([1.0, 1.0])}
    masks = {"a": np.array([1, 1, 0]), "b": np.array([1, 1])}
    ranked = rank_scores(scores, masks, flops_cost={"a": 2.0, "b": 0.5}, flops_regularization=0.1)
    # The removed channel is left out of the L2 norm: sqrt(3^2 + 4^2) = 5.
    np.testing.assert_allclose(ranked["a"], [0.6 - 0.2, 0.8 - 0.2, -np.inf])
    np.testing.assert_allclose(ranked["b"], np.full(2, 1 / np.sqrt(2) - 0.05))
    raw = rank_scores(scores, masks, normalization="none")
    np.testing.assert_array_equal(raw["a"], [3.0, 4.0, -np.inf])


def test_bad_configs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="no stopping rule"):
        check_config(IterativeConfig())
    with pytest.raises(ValueError, match="must lie in \\(0, 1\\]"):
        check_config(IterativeConfig(target_flops=1.5))
    with pytest.raises(ValueError, match="not a registered criterion"):
        check_config(IterativeConfig(criterion="tailor", max_steps=1))
    with pytest.raises(ValueError, match="constant learning rate"):
        opt = train.OptimizerConfig(name="sgd", schedule="cosine")
        check_config(IterativeConfig(max_steps=1, optimizer=opt))
    with pytest.raises(ValueError, match="score_updates"):
        check_config(IterativeConfig(max_steps=1, score_updates=11))


# ---------------------------------------------------------------------------------------------
# Shrinking


def test_shrink_gives_the_masked_outputs_and_keeps_surviving_momentum(lenet):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)), jnp.float32)
    network = make_network(build_model("lenet5", 10).apply, lenet, x[:1])
    tx = train.make_optimizer(train.OptimizerConfig(name="sgd", learning_rate=0.01), 10, 1)
    masks = {n: jnp.ones(network.graph[n].size) for n in network.graph.names}
    masks["conv1"] = masks["conv1"].at[jnp.array([0, 4])].set(0.0)
    masks["conv2"] = masks["conv2"].at[jnp.array([1, 2, 15])].set(0.0)
    model = Model.from_apply(network.gated_apply_fn, x[:1], train_flag="train")
    state = train.create_train_state(
        model, tx, jax.random.key(0), x[:1], masks=masks, variables=lenet
    )
    batch = {"image": x, "label": jnp.arange(8) % 10}
    for _ in range(2):  # some momentum to carry over
        state, _ = train.train_step(state, batch)
    masked_logits = state.apply_fn(state.variables(), x)

    small, smaller, applied = shrink(
        state, network, lambda w: build_model("lenet5", 10, w).apply, x[:1]
    )
    np.testing.assert_array_equal(applied["conv1"], [1, 2, 3, 5])
    assert widths_from_params(small.params)["conv2"] == 13
    assert smaller.graph["conv2"].size == 13
    assert all(np.all(np.asarray(m) == 1) for m in small.masks.values())
    np.testing.assert_allclose(small.apply_fn(small.variables(), x), masked_logits, atol=1e-5)

    big_trace, small_trace = state.opt_state[0].trace, small.opt_state[0].trace
    keep1, keep2 = applied["conv1"], applied["conv2"]
    np.testing.assert_array_equal(
        small_trace["conv2"]["kernel"], big_trace["conv2"]["kernel"][:, :, keep1][..., keep2]
    )
    np.testing.assert_array_equal(small_trace["conv1"]["bias"], big_trace["conv1"]["bias"][keep1])
    assert np.abs(np.asarray(small_trace["conv2"]["kernel"])).sum() > 0
    # The shrunk state trains on: one more step runs with the new shapes.
    small, metrics = train.train_step(small, batch)
    assert np.isfinite(float(metrics["loss"]))


# ---------------------------------------------------------------------------------------------
# Whole runs on LeNet-5


def test_each_step_removes_the_k_lowest_normalised_scores_and_stops_at_the_flops_target(
    lenet, tiny_data
):
    config = small_config(criterion="random", channels_per_step=3, updates_per_step=1)
    result = iterative_prune(config, "lenet5", lenet, tiny_data)
    history = result.history
    assert result.summary["stop_reason"] == "target"
    flops_left = [r["remaining"]["flops"] for r in history]
    assert flops_left[-1] <= 0.6 < min(flops_left[:-1])

    # Reference: the random criterion of step t draws with seed t; no shrink happens before
    # the end, so every group keeps its base size and indices.
    graph = make_network(build_model("lenet5", 10).apply, lenet, jnp.zeros((1, 28, 28, 1))).graph
    masks = {g.name: np.ones(g.size) for g in graph.groups}
    for record in history:
        scores = {}
        for group in ("conv1", "conv2"):
            raw = np.random.default_rng([record["step"], zlib.crc32(group.encode())]).random(
                graph[group].size
            )
            alive = masks[group] != 0
            raw[alive] /= np.sqrt(np.sum(raw[alive] ** 2))
            raw[~alive] = -np.inf
            scores[group] = raw
        expected = reference_removals(scores, masks, ["conv1", "conv2"], 3, 1)
        assert [(g, c) for g, c, _ in record["removed"]] == expected
        for g, c in expected:
            masks[g][c] = 0
    for group in ("conv1", "conv2"):
        np.testing.assert_array_equal(result.keep[group], np.nonzero(masks[group])[0])
        assert result.widths[group] == len(result.keep[group])
    # Dense layers are out of scope: untouched.
    assert result.widths["fc1"] == 120


def test_masked_training_compiles_once_and_shrinking_every_step_gives_the_same_run(
    lenet, tiny_data
):
    masked = iterative_prune(small_config(), "lenet5", lenet, tiny_data)
    steps = masked.history
    assert len(steps) >= 4
    # Step 1 compiles the train step, the criterion and the evaluation; the later steps reuse
    # them (the last one shrinks, which slices arrays of new shapes).
    assert steps[0]["time"]["compiles"] > 0
    assert [r["time"]["compiles"] for r in steps[1:-1]] == [0] * (len(steps) - 2)
    assert [r["shrunk"] for r in steps] == [False] * (len(steps) - 1) + [True]

    shrunk = iterative_prune(small_config(shrink_every=1), "lenet5", lenet, tiny_data)
    assert all(r["shrunk"] for r in shrunk.history)
    for a, b in zip(masked.history, shrunk.history, strict=True):
        assert [x[:2] for x in a["removed"]] == [x[:2] for x in b["removed"]]
        np.testing.assert_allclose(a["validation"]["loss"], b["validation"]["loss"], rtol=1e-4)
    chex.assert_trees_all_close(masked.variables, shrunk.variables, atol=1e-5)
    assert masked.widths == shrunk.widths


def test_accuracy_floor_undoes_the_step_that_breaks_it(lenet, tiny_data):
    config = small_config(criterion="random", target_flops=None, min_accuracy=0.999)
    result = iterative_prune(config, "lenet5", lenet, tiny_data)
    (record,) = result.history
    assert result.summary["stop_reason"] == "accuracy_floor" and record["reverted"]
    assert record["validation"]["accuracy"] < 0.999
    assert record["remaining"]["flops"] == 1.0
    assert result.widths["conv1"] == 6 and result.widths["conv2"] == 16


def test_a_user_model_prunes_through_rebuild_and_resumes(tmp_path, tiny_data):
    x = jnp.zeros((1, 28, 28, 1))
    model = ConvBNDense(widths=(("head", 10),))
    variables = model.init(jax.random.key(0), x)

    def rebuild(widths):
        return ConvBNDense(widths=tuple(sorted(widths.items()))).apply

    config = small_config(max_steps=2, target_flops=None, shrink_every=1)
    first = iterative_prune(config, rebuild, variables, tiny_data, workdir=tmp_path)
    assert first.widths["conv0"] + first.widths["conv1"] == 14 - 4
    assert set(first.variables) == {"params", "batch_stats"}
    # A finished workdir is restored (through orbax, the model is not in the zoo).
    again = iterative_prune(config, rebuild, variables, tiny_data, workdir=tmp_path)
    chex.assert_trees_all_equal(again.variables, first.variables)
    with pytest.raises(checkpoint.CheckpointError, match="another IterativeConfig"):
        iterative_prune(
            dataclasses.replace(config, channels_per_step=1),
            rebuild,
            variables,
            tiny_data,
            workdir=tmp_path,
        )
    with pytest.raises(ValueError, match="zoo model name or a callable"):
        iterative_prune(config, 3, variables, tiny_data)


# ---------------------------------------------------------------------------------------------
# Kill and resume


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    command = [sys.executable, str(TESTS_DIR / "iterative_run.py")]
    expected, killed_at, _ = kill_and_resume(command, tmp_path, "checkpoints")
    assert max(killed_at) < expected["summary"]["updates"]
    assert expected["summary"]["stop_reason"] == "target"
    assert any(r["shrunk"] for r in expected["history"][:-1])  # the resume crosses a shrink


# ---------------------------------------------------------------------------------------------
# The command line and the paper-scale configs


def run_prune_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxprune")
    prune_command.add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("method", ["iterative", "oneshot"])
def test_prune_command_writes_a_loadable_pruned_model(tmp_path, method, capsys):
    argv = [
        "prune",
        f"--method={method}",
        f"--model-file={LENET}",
        f"--workdir={tmp_path}",
        "--set=data.validation_examples=128",
        "--set=data.test_examples=128",
        "--set=oneshot.score_examples=128",
    ]
    if method == "iterative":
        argv += ["--criterion=taylor", "--target-flops=0.7", "--channels-per-step=3"]
        argv += ["--updates-per-step=2", "--train-examples=320", "--no-progress"]
    else:
        argv += ["--criterion=l1", "--ratio=0.5"]
    assert run_prune_command(argv) == 0
    model, variables, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["job"]["method"] == method and report["model"] == "lenet5"
    widths = widths_from_params(variables["params"])
    assert widths["conv1"] + widths["conv2"] < 22
    assert report["widths"] == widths and meta["method"] == method
    final = report["summary"]["final"]["remaining"]["flops"]
    assert final <= 0.7 if method == "iterative" else final < 0.5
    assert 0.0 < report["summary"]["test"]["accuracy"] <= 1.0
    assert "pruned by " + method in capsys.readouterr().out


def narrow_vgg16_file(path: Path, num_classes: int, image_size: int) -> Path:
    widths = {f"conv{i}": 4 for i in range(1, 14)} | {"fc1": 8, "fc2": 8}
    model = build_model("vgg16", num_classes, widths)
    x = jnp.zeros((1, image_size, image_size, 3))
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    return checkpoint.save_model_file(
        path,
        model_name="vgg16",
        num_classes=num_classes,
        widths=widths_from_params(variables["params"]),
        variables=variables,
        meta={},
        input_shape=x.shape[1:],
    )


@pytest.mark.parametrize(
    "name, num_classes, updates",
    [("iterative_vgg16_birds", 200, 30), ("iterative_vgg16_flowers", 102, 10)],
)
def test_paper_configs_run_a_few_steps_on_mock_data(tmp_path, name, num_classes, updates):
    job = load_config(REPO_ROOT / "experiments" / f"{name}.py")
    assert job.model == "vgg16" and job.iterative.updates_per_step == updates
    assert job.iterative.batch_size == 32 and job.iterative.channels_per_step == 1
    assert job.iterative.optimizer.learning_rate == job.iterative.optimizer.weight_decay == 1e-4
    tiny = dataclasses.replace(
        job,
        model_file=str(narrow_vgg16_file(tmp_path / "base.msgpack", num_classes, 32)),
        data=dataclasses.replace(
            job.data,
            data_dir=str(tmp_path / "data"),
            image_size=32,
            validation_size=4 if job.data.name == "caltech_birds2011" else None,
        ),
        iterative=dataclasses.replace(
            job.iterative,
            batch_size=4,
            updates_per_step=2,
            max_steps=2,
            eval_every=1,
            eval_batch_size=8,
            progress=False,
        ),
    )
    with tfds.testing.mock_data(num_examples=12):
        report = prune_command.run_job(tiny, tmp_path / "run")
    assert [len(r["removed"]) for r in report["history"]] == [1, 1]
    assert sum(report["widths"][f"conv{i}"] for i in range(1, 14)) == 13 * 4 - 2
    assert report["summary"]["stop_reason"] == "max_steps"


def test_zoo_name_refuses_a_user_module():
    with pytest.raises(ValueError, match="not a zoo model"):
        prune_command.zoo_name(nn.Dense(3))
