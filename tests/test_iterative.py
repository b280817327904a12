"""Iterative pruning (Molchanov et al. 2017): selection, stopping, shrinks, any model, resume,
divergence, the CLI and the paper-scale configs."""

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
from flax import nnx
from kill_resume import kill_and_resume, without_times
from user_models import CompactHardCoded, NnxCNN, ShapeBranchResNet, init_linen

import jaxprune as jp
from jaxprune import checkpoint, data, train
from jaxprune.cli import load_config
from jaxprune.commands import prune as prune_command
from jaxprune.fit import DivergenceError
from jaxprune.methods.contract import BatchList, Splits
from jaxprune.methods.iterative import (
    IterativeConfig,
    choose_removals,
    iterative_prune,
    rank_scores,
    remove_channels,
)
from jaxprune.methods.iterative_checkpoint import SEQUENCE
from jaxprune.methods.iterative_network import make_network, shrink, structs
from jaxprune.model import Model
from jaxprune.models import build_model
from jaxprune.run import RunMismatchError

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
LENET = REPO_ROOT / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


@pytest.fixture(scope="module")
def lenet():
    module, variables, _ = checkpoint.load_model_file(LENET)
    return Model.linen(module, jnp.zeros((1, 28, 28, 1)), variables=variables), variables


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
    )
    return IterativeConfig(**{**values, **changes})


def random_batches(shape, classes: int, count: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.standard_normal(shape).astype(np.float32),
            "label": rng.integers(0, classes, shape[0]).astype(np.int32),
        }
        for _ in range(count)
    ]


def widths(variables) -> dict[str, int]:
    return jp.widths_from_params(variables["params"])


def removed_by_history(history) -> dict[str, set[int]]:
    """Per group, the original channels the history says were removed (reverted steps aside)."""
    removed: dict[str, set[int]] = {}
    for record in history:
        if not record["reverted"]:
            for group, channel, _ in record["removed"]:
                removed.setdefault(group, set()).add(channel)
    return removed


def assert_keep_matches_history(result) -> None:
    """What the history removed is exactly what `keep` lacks, and the variables have the
    kept widths (the pruned program refuses others)."""
    removed = removed_by_history(result.history)
    for group in result.graph.groups:
        kept = set(np.asarray(result.keep[group.name]).tolist())
        assert kept | removed.get(group.name, set()) == set(range(group.size)), group.name
        assert not kept & removed.get(group.name, set())
    if isinstance(result.model.apply_fn, jp.PrunedProgram):
        result.model.apply_fn.check_variables(result.variables)


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


def test_a_group_normalised_in_blocks_loses_whole_blocks():
    # "g": 3 blocks of 2 (GroupNorm); block means 0.5, 0.15, 3.0. "p": plain channels.
    ranked = {"g": np.array([0.9, 0.1, 0.2, 0.1, 3.0, 3.0]), "p": np.array([0.12, 0.4, 0.6])}
    masks = {"g": np.ones(6), "p": np.ones(3)}
    got = choose_removals(ranked, masks, ["g", "p"], 3, blocks={"g": 2})
    # The lowest block (mean 0.15) goes whole, then p's channel 0: 3 channels.
    assert got == [("p", 0), ("g", 2), ("g", 3)]
    # One channel asked for: the lowest candidate is a block, so two go.
    assert choose_removals(ranked, masks, ["g"], 1, blocks={"g": 2}) == [("g", 2), ("g", 3)]
    # The last block is never removed, and min_channels counts channels.
    assert choose_removals(ranked, masks, ["g"], 100, blocks={"g": 2}) == [
        ("g", 2),
        ("g", 3),
        ("g", 0),
        ("g", 1),
    ]
    assert choose_removals(ranked, masks, ["g"], 100, min_channels=3, blocks={"g": 2}) == [
        ("g", 2),
        ("g", 3),
    ]
    with pytest.raises(ValueError, match="partly removed blocks"):
        choose_removals(ranked, {"g": np.array([1, 0, 1, 1, 1, 1])}, ["g"], 1, blocks={"g": 2})


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
        IterativeConfig().check()
    with pytest.raises(ValueError, match="must lie in \\(0, 1\\]"):
        IterativeConfig(target_flops=1.5).check()
    with pytest.raises(ValueError, match="not a registered criterion"):
        IterativeConfig(criterion="tailor", max_steps=1).check()
    with pytest.raises(ValueError, match="constant learning rate"):
        opt = train.OptimizerConfig(name="sgd", schedule="cosine")
        IterativeConfig(max_steps=1, optimizer=opt).check()
    with pytest.raises(ValueError, match="score_updates"):
        IterativeConfig(max_steps=1, score_updates=11).check()
    with pytest.raises(ValueError, match="eval_examples"):
        IterativeConfig(max_steps=1, eval_examples=0).check()
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        opt = train.OptimizerConfig(name="sgd", learning_rate=0.0)
        IterativeConfig(max_steps=1, optimizer=opt).check()


# ---------------------------------------------------------------------------------------------
# Shrinking


@pytest.mark.slow
def test_shrink_gives_the_masked_outputs_and_keeps_surviving_momentum(lenet):
    model, variables = lenet
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)), jnp.float32)
    graph = jp.channel_graph(model.apply_fn, variables, x[:1], **model.eval_kwargs)
    full = {g.name: np.arange(g.size) for g in graph.groups}
    network = make_network(model, graph, structs(variables), full)
    tx = train.make_optimizer(train.OptimizerConfig(name="sgd", learning_rate=0.01), 10, 1)
    masks = network.full_masks()
    masks["conv1"] = masks["conv1"].at[jnp.array([0, 4])].set(0.0)
    masks["conv2"] = masks["conv2"].at[jnp.array([1, 2, 15])].set(0.0)
    state = train.create_train_state(
        network.model, tx, jax.random.key(0), x[:1], masks=masks, variables=variables
    )
    batch = {"image": x, "label": jnp.arange(8) % 10}
    for _ in range(2):  # some momentum to carry over
        state, _ = train.train_step(state, batch)
    masked_logits = state.model(state.variables(), x)

    small, smaller = shrink(state, network, model, graph, structs(variables))
    np.testing.assert_array_equal(smaller.keep["conv1"], [1, 2, 3, 5])
    assert widths(small.variables())["conv2"] == 13
    assert smaller.graph["conv2"].size == 13
    assert all(np.all(np.asarray(m) == 1) for m in small.masks.values())
    np.testing.assert_allclose(small.model(small.variables(), x), masked_logits, atol=1e-5)

    big_trace, small_trace = state.opt_state[0].trace, small.opt_state[0].trace
    keep1, keep2 = smaller.keep["conv1"], np.delete(np.arange(16), [1, 2, 15])
    np.testing.assert_array_equal(
        small_trace["conv2"]["kernel"], big_trace["conv2"]["kernel"][:, :, keep1][..., keep2]
    )
    np.testing.assert_array_equal(small_trace["conv1"]["bias"], big_trace["conv1"]["bias"][keep1])
    assert np.abs(np.asarray(small_trace["conv2"]["kernel"])).sum() > 0
    # The shrunk state trains on: one more step runs with the new shapes.
    small, metrics = train.train_step(small, batch)
    assert np.isfinite(float(metrics["loss"]))
    # A second shrink composes onto the original channels (indices of the original graph).
    small = small.replace(masks={**small.masks, "conv1": jnp.array([1.0, 0.0, 1.0, 1.0])})
    _, smallest = shrink(small, smaller, model, graph, structs(variables))
    np.testing.assert_array_equal(smallest.keep["conv1"], [1, 3, 5])


# ---------------------------------------------------------------------------------------------
# Whole runs on LeNet-5


def test_each_step_removes_the_k_lowest_normalised_scores_and_stops_at_the_flops_target(
    lenet, tiny_data
):
    model, variables = lenet
    config = small_config(criterion="random", channels_per_step=3, updates_per_step=1)
    result = iterative_prune(model, variables, tiny_data, config, progress=False)
    history = result.history
    assert result.summary["method"]["stop_reason"] == "target"
    flops_left = [r["remaining"]["flops"] for r in history]
    assert flops_left[-1] <= 0.6 < min(flops_left[:-1])
    cost = result.summary["cost"]
    assert cost["after"]["flops"] / cost["before"]["flops"] == pytest.approx(flops_left[-1])

    # Reference: the random criterion of step t draws with seed t; no shrink happens before
    # the end, so every group keeps its base size and indices.
    graph = result.graph
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
    pruned_widths = widths(result.variables)
    for group in ("conv1", "conv2"):
        np.testing.assert_array_equal(result.keep[group], np.nonzero(masks[group])[0])
        assert pruned_widths[group] == len(result.keep[group])
    # Dense layers are out of scope: untouched.
    assert pruned_widths["fc1"] == 120


@pytest.mark.slow
def test_masked_training_compiles_once_and_shrinking_every_step_gives_the_same_run(
    lenet, tiny_data
):
    model, variables = lenet
    masked = iterative_prune(model, variables, tiny_data, small_config(), progress=False)
    steps = masked.history
    assert len(steps) >= 4
    # Step 1 compiles the train step, the criterion and the evaluation; the later steps reuse
    # them (the last one shrinks, which slices arrays of new shapes).
    assert steps[0]["time"]["compiles"] > 0
    assert [r["time"]["compiles"] for r in steps[1:-1]] == [0] * (len(steps) - 2)
    assert [r["shrunk"] for r in steps] == [False] * (len(steps) - 1) + [True]

    config = small_config(shrink_every=1)
    shrunk = iterative_prune(model, variables, tiny_data, config, progress=False)
    assert all(r["shrunk"] for r in shrunk.history)
    for a, b in zip(masked.history, shrunk.history, strict=True):
        assert [x[:2] for x in a["removed"]] == [x[:2] for x in b["removed"]]
        np.testing.assert_allclose(a["validation"]["loss"], b["validation"]["loss"], rtol=1e-4)
    chex.assert_trees_all_close(masked.variables, shrunk.variables, atol=1e-5)
    assert widths(masked.variables) == widths(shrunk.variables)


def test_accuracy_floor_undoes_the_step_that_breaks_it(lenet, tiny_data):
    model, variables = lenet
    config = small_config(criterion="random", target_flops=None, min_accuracy=0.999)
    result = iterative_prune(model, variables, tiny_data, config, progress=False)
    (record,) = result.history
    assert result.summary["method"]["stop_reason"] == "accuracy_floor" and record["reverted"]
    assert record["validation"]["accuracy"] < 0.999
    assert record["remaining"]["flops"] == 1.0
    assert widths(result.variables)["conv1"] == 6 and widths(result.variables)["conv2"] == 16


# ---------------------------------------------------------------------------------------------
# Any model: hard-coded widths, NNX, a layer down to one channel


class Narrow(nn.Module):
    """Two convolutions of 3 and 4 kernels: both reach one kernel within a few steps."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.slow
def test_a_hard_coded_model_prunes_resumes_and_refuses_another_run(tmp_path):
    module, variables, x, _ = init_linen(ShapeBranchResNet)
    model = Model.linen(module, x, variables=variables)
    batches = random_batches((8, 16, 16, 3), 5)
    config = IterativeConfig(
        criterion="taylor", channels_per_step=3, updates_per_step=2, max_steps=3, shrink_every=2
    )
    first = iterative_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    assert first.summary["method"]["stop_reason"] == "max_steps"
    assert [r["shrunk"] for r in first.history] == [False, True, True]
    assert sum(len(r["removed"]) for r in first.history) == 9
    assert_keep_matches_history(first)
    assert first.summary["cost"]["after"]["macs"] < first.summary["cost"]["before"]["macs"]
    # The pruned program runs at any batch size, under jit.
    logits = jax.jit(first.model.__call__)(first.variables, jnp.ones((3, 16, 16, 3)))
    assert logits.shape == (3, 5) and np.all(np.isfinite(logits))
    assert json.loads((tmp_path / "result.json").read_text())["method"]["pruning_steps"] == 3

    # A finished workdir is restored: the same result, without pruning again.
    again = iterative_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    chex.assert_trees_all_equal(again.variables, first.variables)
    assert without_times(list(again.history)) == without_times(list(first.history))
    with pytest.raises(RunMismatchError, match=r"config.channels_per_step: 3 -> 1"):
        iterative_prune(
            model,
            variables,
            batches,
            dataclasses.replace(config, channels_per_step=1),
            workdir=tmp_path,
        )


@pytest.mark.slow
def test_an_nnx_model_prunes_through_its_pruned_program():
    module = NnxCNN(rngs=nnx.Rngs(0))
    x = jnp.zeros(NnxCNN.SHAPE)
    model, variables = Model.nnx(module, x)
    batches = random_batches((8, 12, 12, 1), 10)
    config = IterativeConfig(
        criterion="taylor", channels_per_step=4, updates_per_step=2, max_steps=2, shrink_every=1
    )
    result = iterative_prune(model, variables, batches, config, progress=False)
    assert_keep_matches_history(result)
    assert sum(len(r["removed"]) for r in result.history) == 8
    pruned_widths = widths(result.variables)
    assert pruned_widths["conv1"] + pruned_widths["conv2"] == 16 + 32 - 8
    assert pruned_widths["conv1"] == result.keep["conv1"].size
    # The depthwise convolution produces conv2's channels too: it loses the same ones.
    assert pruned_widths["dw"] == pruned_widths["conv2"] == result.keep["conv2"].size
    assert set(result.variables) == {"params", "batch_stats"}
    assert result.model(result.variables, batches[0]["image"]).shape == (8, 10)
    after = result.summary["validation"]["after"]
    assert after["count"] == 24 and np.isfinite(after["loss"])


def test_a_layer_down_to_one_channel_is_shrunk_and_pruning_goes_on():
    # Such a group has no channel axis in the pruned program's graph (an axis of size 1 reads
    # as a broadcast); it used to crash the shrink that followed.
    module = Narrow()
    x = jnp.zeros((4, 8, 8, 1))
    variables = module.init(jax.random.key(0), x)
    model = Model.linen(module, x, variables=variables)
    batches = random_batches((4, 8, 8, 1), 3)
    config = IterativeConfig(
        criterion="random",
        channels_per_step=1,
        updates_per_step=1,
        target_channels=0.01,
        shrink_every=1,
        min_channels=1,
    )
    result = iterative_prune(model, variables, batches, config, progress=False)
    assert result.summary["method"]["stop_reason"] == "nothing_left"
    assert {name: kept.size for name, kept in result.keep.items()} == {
        "Conv_0": 1,
        "Conv_1": 1,
    }
    assert [len(r["removed"]) for r in result.history] == [1, 1, 1, 1, 1, 0]
    assert all(r["shrunk"] for r in result.history)
    assert_keep_matches_history(result)
    assert widths(result.variables) == {"Conv_0": 1, "Conv_1": 1, "Dense_0": 3}
    assert np.all(np.isfinite(result.model(result.variables, batches[0]["image"])))


# ---------------------------------------------------------------------------------------------
# Divergence


def test_divergence_names_the_update_and_the_loss_not_the_criterion(tmp_path):
    module = Narrow()
    x = jnp.zeros((4, 8, 8, 1))
    variables = module.init(jax.random.key(0), x)
    model = Model.linen(module, x, variables=variables)
    batches = random_batches((4, 8, 8, 1), 3, count=2)
    poisoned = [{**b, "image": np.full_like(b["image"], np.nan)} for b in batches]
    # Epoch 0 trains normally; epoch 1 makes the loss NaN.
    data_ = Splits(lambda epoch: batches if epoch == 0 else poisoned, batches)
    config = IterativeConfig(criterion="l1", updates_per_step=2, max_steps=4)
    with pytest.raises(DivergenceError) as error:
        iterative_prune(model, variables, data_, config, workdir=tmp_path, progress=False)
    message = str(error.value)
    assert "diverged at update 3 (loss nan" in message
    assert "the checkpoint of update 2 is kept" in message and "criterion" not in message
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints" / SEQUENCE).iterdir()) == [2]

    # A huge step leaves non-finite weights after a finite loss and gradient; a weight
    # criterion read them next, and its NaN scores said to fix the criterion.
    huge = train.OptimizerConfig(name="sgd", learning_rate=1e34, schedule="constant")
    config = IterativeConfig(
        criterion="min_weight", updates_per_step=1, max_steps=2, optimizer=huge
    )
    large = [{**b, "image": b["image"] * np.float32(1e6)} for b in batches]
    with pytest.raises(DivergenceError, match=r"diverged at update 1 \(the parameters"):
        iterative_prune(model, variables, large, config, progress=False)


# ---------------------------------------------------------------------------------------------
# Stop and resume


class Interrupted(Exception):
    pass


@dataclasses.dataclass
class StopsAfter:
    """Training data that raises after `batches` batches, as a killed run stops."""

    data: BatchList
    batches: int
    read: int = 0

    def train(self, epoch):
        for batch in self.data.train(epoch):
            if self.read == self.batches:
                raise Interrupted
            self.read += 1
            yield batch

    def validation(self):
        return self.data.validation()


@pytest.mark.slow
def test_a_stopped_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    module, variables, x, _ = init_linen(CompactHardCoded)
    model = Model.linen(module, x, variables=variables)
    batches = BatchList(tuple(random_batches((8, 16, 16, 3), 10, count=3)))
    config = IterativeConfig(
        criterion="taylor",
        channels_per_step=4,
        updates_per_step=2,
        max_steps=4,
        shrink_every=2,
        final_updates=3,
    )
    whole = iterative_prune(model, variables, batches, config, progress=False)
    # Stopped in step 3 (after the shrink of step 2), then in the final fine-tuning; each run
    # reads one batch for its identity, and a resumed one one more to skip to its position.
    for stop, resumed_from in ((5, 4), (7, 8)):
        with pytest.raises(Interrupted):
            iterative_prune(
                model,
                variables,
                StopsAfter(batches, stop),
                config,
                workdir=tmp_path,
                progress=False,
            )
        store = tmp_path / "checkpoints" / SEQUENCE
        assert max(int(p.name) for p in store.iterdir()) == resumed_from
    resumed = iterative_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    chex.assert_trees_all_equal(resumed.variables, whole.variables)
    assert without_times(list(resumed.history)) == without_times(list(whole.history))
    assert without_times(resumed.summary) == without_times(whole.summary)
    assert resumed.summary["method"]["updates"] == 4 * 2 + 3


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    command = [sys.executable, str(TESTS_DIR / "iterative_run.py")]
    checkpoints = f"run/checkpoints/{SEQUENCE}"
    expected, killed_at, _ = kill_and_resume(command, tmp_path, checkpoints)
    assert max(killed_at) < expected["summary"]["method"]["updates"]
    assert expected["summary"]["method"]["stop_reason"] == "target"
    assert any(r["shrunk"] for r in expected["history"][:-1])  # the resume crosses a shrink


# ---------------------------------------------------------------------------------------------
# The command line and the paper-scale configs


def run_prune_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxprune")
    prune_command.add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.slow
def test_prune_command_writes_the_final_zoo_model(tmp_path, capsys):
    argv = [
        "prune",
        "--method=iterative",
        "--model=lenet5",
        f"--variables={LENET}",
        f"--workdir={tmp_path}",
        "--set=data.validation_examples=128",
        "--set=data.test_examples=128",
        "--set=data.train_examples=320",
        "--iterative.criterion=taylor",
        "--iterative.target-flops=0.7",
        "--iterative.channels-per-step=3",
        "--iterative.updates-per-step=2",
        "--iterative.final-updates=2",
        "--no-progress",
    ]
    assert run_prune_command(argv) == 0
    model, variables, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["job"]["method"] == "iterative" and report["model"]["zoo"] == "lenet5"
    pruned_widths = widths(variables)
    assert pruned_widths["conv1"] + pruned_widths["conv2"] < 22
    assert {g: pruned_widths[g] for g in ("conv1", "conv2")} == {
        g: report["widths"]["after"][g] for g in ("conv1", "conv2")
    }
    assert meta["method"] == "iterative" and meta["keep"] == report["keep"]
    assert report["cost"]["remaining"]["flops"] <= 0.7
    assert report["summary"]["method"]["stop_reason"] == "target"
    # The file is the model after the final updates, with the report's test accuracy.
    dataset = data.load(data.DataConfig(**report["job"]["data"]))
    test = train.evaluate(
        Model.linen(model, jnp.zeros((1, 28, 28, 1))),
        variables,
        data.preprocessed_batches(dataset, "test", 128),
    )
    assert test["accuracy"] == report["metrics"]["pruned"]["test"]["accuracy"]
    assert "pruned by iterative / taylor" in capsys.readouterr().out


def narrow_vgg16(num_classes: int, image_size: int) -> tuple[Model, dict]:
    narrow = {f"conv{i}": 4 for i in range(1, 14)} | {"fc1": 8, "fc2": 8}
    module = build_model("vgg16", num_classes, narrow)
    x = jnp.zeros((1, image_size, image_size, 3))
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    return Model.linen(module, x, variables=variables), variables


@pytest.mark.parametrize(
    "name, num_classes, updates",
    [("iterative_vgg16_birds", 200, 30), ("iterative_vgg16_flowers", 102, 10)],
)
@pytest.mark.slow
def test_paper_configs_run_a_few_steps_on_mock_data(tmp_path, name, num_classes, updates):
    job = load_config(REPO_ROOT / "experiments" / f"{name}.py")
    assert job.method == "iterative" and job.model == "vgg16"
    assert job.variables.endswith("base.msgpack") and job.iterative.updates_per_step == updates
    assert job.iterative.batch_size == 32 and job.iterative.channels_per_step == 1
    assert job.iterative.optimizer.learning_rate == job.iterative.optimizer.weight_decay == 1e-4
    data_config = dataclasses.replace(
        job.data,
        data_dir=str(tmp_path / "data"),
        image_size=32,
        validation_size=4 if job.data.name == "caltech_birds2011" else None,
    )
    config = dataclasses.replace(
        job.iterative, batch_size=4, updates_per_step=2, max_steps=2, eval_every=1
    )
    model, variables = narrow_vgg16(num_classes, 32)
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load(data_config)
        result = iterative_prune(
            model, variables, dataset, config, workdir=str(tmp_path / "run"), progress=False
        )
    assert [len(r["removed"]) for r in result.history] == [1, 1]
    assert sum(widths(result.variables)[f"conv{i}"] for i in range(1, 14)) == 13 * 4 - 2
    assert result.summary["method"]["stop_reason"] == "max_steps"
