"""Tests of jaxprune.train: steps, optimizers, evaluation, kappa, sharding and the loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_helpers import simulated_devices_env

from jaxprune import data, train, train_job
from jaxprune.run import Checkpoints

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
# A LeNet-5 small enough to compile and train in a few seconds.
TINY_LENET = {"conv1": 2, "conv2": 4, "fc1": 8, "fc2": 8}


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> Dense: every kind of state a step touches."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def synthetic_problem(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images whose label is the quadrant of the image with the largest mean."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, 6, 6, 1)).astype(np.float32)
    labels = np.argmax(
        [images[:, :3, :3].mean((1, 2, 3)), images[:, 3:, 3:].mean((1, 2, 3)), np.zeros(count)],
        axis=0,
    ).astype(np.int32)
    return {"image": images, "label": labels}


def tiny_state(config: train.OptimizerConfig | None = None, dropout: float = 0.0, **kwargs):
    tx = train.make_optimizer(config or train.OptimizerConfig(), 10, 3, **kwargs)
    return train.create_train_state(
        TinyNet(dropout=dropout), tx, jax.random.key(0), jnp.zeros((1, 6, 6, 1))
    )


class SyntheticDataset:
    """A stand-in for `jaxprune.data.Dataset` (the `dataset=` hook of `train_and_evaluate`).

    Random 28x28x1 float images with random labels; `nan_at=(epoch, batch_index)` puts a NaN
    pixel in one training batch.
    """

    num_classes = 10
    image_shape = (28, 28, 1)

    def __init__(self, sizes=None, nan_at=None):
        sizes = sizes or {"train": 64, "validation": 24, "test": 24}
        rng = np.random.default_rng(0)
        self.splits = {
            name: {
                "image": rng.normal(size=(size, 28, 28, 1)).astype(np.float32),
                "label": rng.integers(0, 10, size).astype(np.int32),
            }
            for name, size in sizes.items()
        }
        self.nan_at = nan_at

    def num_batches(self, split, batch_size, *, drop_remainder=True):
        count = len(self.splits[split]["label"])
        return count // batch_size if drop_remainder else -(-count // batch_size)

    def iterate(
        self,
        split,
        batch_size,
        *,
        seed=0,
        epoch=0,
        shuffle=True,
        drop_remainder=True,
        start_batch=0,
    ):
        arrays = self.splits[split]
        count = len(arrays["label"])
        order = np.random.default_rng([seed, epoch]).permutation(count) if shuffle else None
        for index in range(
            start_batch, self.num_batches(split, batch_size, drop_remainder=drop_remainder)
        ):
            rows = slice(index * batch_size, (index + 1) * batch_size)
            rows = order[rows] if order is not None else rows
            batch = {key: value[rows].copy() for key, value in arrays.items()}
            if split == "train" and self.nan_at == (epoch, index):
                batch["image"][0, 0, 0, 0] = np.nan
            yield batch

    def preprocess(self, images, labels, rng=None, *, train=False):
        return jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)


def loop_config(**overrides) -> train_job.TrainConfig:
    values = dict(
        model="lenet5",
        widths=TINY_LENET,
        data=data.DataConfig(batch_size=16),
        optimizer=train.OptimizerConfig(learning_rate=0.01),
        epochs=2,
        checkpoint_every_steps=2,
        log_every_steps=2,
        eval_batch_size=10,
        progress=False,
    )
    values.update(overrides)
    return train_job.TrainConfig(**values)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def test_loss_decreases_on_a_tiny_problem():
    batch = synthetic_problem(32)
    state = tiny_state(train.OptimizerConfig(learning_rate=0.05), dropout=0.1)
    losses = []
    for _ in range(30):
        state, metrics = train.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert float(metrics["accuracy"]) > 0.8


def test_train_step_updates_batch_stats_and_rng_deterministically():
    batch = synthetic_problem(8)
    state = tiny_state(dropout=0.5)
    first, metrics_a = train.train_step(state, batch)
    second, metrics_b = train.train_step(state, batch)
    chex.assert_trees_all_equal(first.params, second.params)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    assert not np.array_equal(first.rng, state.rng)
    assert not np.allclose(
        first.batch_stats["BatchNorm_0"]["mean"], state.batch_stats["BatchNorm_0"]["mean"]
    )


def test_masks_reach_apply_fn_as_a_collection():
    seen = {}

    def gated_apply(variables, x, **kwargs):
        seen["masks"] = variables.get("masks")
        return TinyNet().apply(
            {k: v for k, v in variables.items() if k != "masks"},
            x * variables["masks"]["gate"],
            **kwargs,
        )

    state = tiny_state()
    state = state.replace(
        model=state.model.with_apply_fn(gated_apply), masks={"gate": jnp.zeros(1)}
    )
    metrics = train.eval_step(state.model, state.variables(), synthetic_problem(6))
    assert seen["masks"] is not None
    assert int(metrics["count"]) == 6


# ---------------------------------------------------------------------------------------------
# Evaluation and kappa
# ---------------------------------------------------------------------------------------------


def numpy_kappa(confusion: np.ndarray) -> float:
    """Kappa as 1 - weighted disagreement / expected disagreement, from the label pairs."""
    labels, predictions = [], []
    for (row, column), count in np.ndenumerate(confusion):
        labels += [row] * int(count)
        predictions += [column] * int(count)
    labels, predictions = np.array(labels), np.array(predictions)
    classes = confusion.shape[0]
    observed = np.zeros((classes, classes))
    np.add.at(observed, (labels, predictions), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(labels)
    disagreement = 1 - np.eye(classes)
    return 1 - (disagreement * observed).sum() / (disagreement * expected).sum()


def test_cohen_kappa_matches_numpy():
    two_by_two = np.array([[20, 5], [10, 15]])
    # p_o = 0.7, p_e = (25 * 30 + 25 * 20) / 50**2 = 0.5, so kappa = 0.2 / 0.5.
    np.testing.assert_allclose(float(train.cohen_kappa(two_by_two)), 0.4, rtol=1e-6)
    confusion = np.array([[20, 5, 0], [3, 15, 2], [1, 4, 10]])
    np.testing.assert_allclose(
        float(train.cohen_kappa(confusion)), numpy_kappa(confusion), rtol=1e-6
    )
    np.testing.assert_allclose(float(train.cohen_kappa(np.diag([3, 4, 5]))), 1.0, rtol=1e-6)
    # A single class on both sides leaves no agreement beyond chance to measure.
    assert float(train.cohen_kappa(np.array([[9, 0], [0, 0]]))) == 0.0
    with pytest.raises(ValueError, match="square"):
        train.cohen_kappa(np.ones((2, 3)))


@pytest.mark.slow
def test_evaluate_counts_every_example_exactly_once():
    examples = synthetic_problem(17, seed=1)
    state = tiny_state()
    for _ in range(3):  # move away from the initial params
        state, _ = train.train_step(state, synthetic_problem(16))
    logits = np.asarray(state.apply_fn(state.variables(), examples["image"], train=False))
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected_loss = -log_probs[np.arange(17), examples["label"]].mean()
    predictions = logits.argmax(1)
    confusion = np.zeros((3, 3), np.int64)
    np.add.at(confusion, (examples["label"], predictions), 1)

    for sizes in ([17], [7, 7, 3], [5, 5, 5, 2], [1] * 17):
        bounds = np.cumsum([0, *sizes])
        batches = [
            {key: value[start:stop] for key, value in examples.items()}
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        result = train.evaluate(state.model, state.variables(), batches)
        assert result["count"] == 17
        np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
        assert result["accuracy"] == pytest.approx(np.mean(predictions == examples["label"]))
        np.testing.assert_allclose(result["kappa"], numpy_kappa(confusion), rtol=1e-5)

    padded = dict(examples, weight=np.r_[np.ones(10), np.zeros(7)].astype(np.float32))
    sums = train.eval_step(state.model, state.variables(), padded)
    assert int(sums["count"]) == 10
    np.testing.assert_array_equal(
        sums["confusion"],
        np.histogram2d(examples["label"][:10], predictions[:10], bins=[np.arange(4)] * 2)[0],
    )
    with pytest.raises(ValueError, match="no examples"):
        train.evaluate(state.model, state.variables(), [])


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

OPTIMIZER_OPTIONS = {
    "sgd": train.OptimizerConfig(momentum=0.0),
    "momentum_l2": train.OptimizerConfig(weight_decay=5e-4),
    "nesterov_cosine_warmup": train.OptimizerConfig(
        nesterov=True, schedule="cosine", warmup_epochs=1, final_lr_fraction=0.1
    ),
    "step_decay": train.OptimizerConfig(schedule="step", decay_epochs=(1, 2)),
    "adam_l2": train.OptimizerConfig(name="adam", learning_rate=1e-3, weight_decay=1e-4),
    "adamw": train.OptimizerConfig(
        name="adam", learning_rate=1e-3, weight_decay=1e-2, weight_decay_type="decoupled"
    ),
    "sgdw_no_norm_decay_clip": train.OptimizerConfig(
        weight_decay=1e-3,
        weight_decay_type="decoupled",
        decay_biases_and_norms=False,
        grad_clip_norm=1.0,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZER_OPTIONS))
def test_every_optimizer_option_builds_and_steps(name):
    state = tiny_state(OPTIMIZER_OPTIONS[name])
    new_state, metrics = train.train_step(state, synthetic_problem(8))
    assert np.isfinite(float(metrics["loss"]))
    kernel = "Conv_0", "kernel"
    before = state.params[kernel[0]][kernel[1]]
    after = new_state.params[kernel[0]][kernel[1]]
    chex.assert_trees_all_equal_shapes(state.params, new_state.params)
    # The nesterov config warms up from a learning rate of 0 at step 0.
    assert np.array_equal(before, after) == (name == "nesterov_cosine_warmup")


def run_updates(config: train.OptimizerConfig, params, gradients):
    tx = train.make_optimizer(config, steps_per_epoch=10, epochs=1)
    opt_state = tx.init(params)
    for gradient in gradients:
        updates, opt_state = tx.update(gradient, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("decay_type", ["l2", "decoupled"])
def test_sgd_weight_decay_matches_numpy(decay_type, nesterov):
    lr, mu, wd = 0.1, 0.9, 0.05
    p0 = np.array([1.0, -2.0, 3.0])
    gradients = [np.array([0.5, 0.1, -0.3]), np.array([-0.2, 0.4, 0.6])]
    config = train.OptimizerConfig(
        learning_rate=lr,
        momentum=mu,
        nesterov=nesterov,
        weight_decay=wd,
        weight_decay_type=decay_type,
    )
    got = run_updates(config, jnp.asarray(p0, jnp.float32), [jnp.asarray(g) for g in gradients])

    p, velocity = p0, np.zeros(3)
    for g in gradients:
        g = g + wd * p if decay_type == "l2" else g
        velocity = mu * velocity + g
        direction = g + mu * velocity if nesterov else velocity
        p = p - lr * (direction + (wd * p if decay_type == "decoupled" else 0))
    np.testing.assert_allclose(np.asarray(got), p, rtol=1e-6)


def test_schedules_reach_their_documented_values():
    step = train.OptimizerConfig(
        learning_rate=0.1, schedule="step", decay_epochs=(2, 3), warmup_epochs=1
    )
    lr = train.make_schedule(step, steps_per_epoch=10, epochs=4)
    np.testing.assert_allclose(
        [float(lr(s)) for s in (0, 5, 10, 19, 20, 29, 30, 39)],
        [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
        rtol=1e-5,
        atol=1e-9,
    )
    cosine = train.OptimizerConfig(learning_rate=0.2, schedule="cosine", final_lr_fraction=0.1)
    lr = train.make_schedule(cosine, steps_per_epoch=10, epochs=2)
    np.testing.assert_allclose(
        [float(lr(0)), float(lr(10)), float(lr(20))], [0.2, 0.11, 0.02], rtol=1e-5
    )


def test_decay_can_skip_biases_and_norms():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    config = train.OptimizerConfig(momentum=0.0, weight_decay=0.5, decay_biases_and_norms=False)
    got = run_updates(config, params, [zero])
    np.testing.assert_array_equal(got["bias"], np.ones(2))
    np.testing.assert_allclose(got["kernel"], np.full((2, 2), 1 - 0.1 * 0.5))


def test_frozen_leaves_do_not_move_nor_count_in_clipping():
    params = {"trained": jnp.zeros(2), "frozen": jnp.ones(1)}
    gradient = {"trained": jnp.array([3.0, 4.0]), "frozen": jnp.array([1000.0])}
    config = train.OptimizerConfig(
        learning_rate=1.0, momentum=0.0, weight_decay=0.1, grad_clip_norm=10.0
    )
    tx = train.make_optimizer(config, 10, 1, trainable={"trained": True, "frozen": False})
    updates, _ = tx.update(gradient, tx.init(params), params)
    np.testing.assert_array_equal(updates["frozen"], [0.0])
    # Norm 5 < 10 once the frozen gradient is left out, so nothing is clipped.
    np.testing.assert_allclose(updates["trained"], [-3.0, -4.0], rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "rmsprop"}, "name"),
        ({"schedule": "linear"}, "schedule"),
        ({"weight_decay_type": "l1"}, "weight_decay_type"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"name": "adam", "nesterov": True}, "nesterov"),
        ({"schedule": "step", "decay_epochs": (3, 1)}, "increasing"),
        ({"decay_epochs": (1,)}, "schedule='step'"),
        ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ],
)
def test_invalid_optimizer_configs_are_refused(overrides, message):
    config = train.OptimizerConfig(**overrides)
    with pytest.raises(ValueError, match=message):
        train.make_optimizer(config, 10, 1)


def test_empty_epoch_is_refused():
    with pytest.raises(ValueError, match="lower the batch size"):
        train.make_optimizer(train.OptimizerConfig(), 0, 1)


# ---------------------------------------------------------------------------------------------
# Data parallelism
# ---------------------------------------------------------------------------------------------


def run_sharded_steps(devices: int, out_path: Path) -> dict:
    env = simulated_devices_env(devices)
    subprocess.run(
        [sys.executable, str(TESTS_DIR / "sharded_steps.py"), str(out_path)],
        check=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    with np.load(out_path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    return {"summary": json.loads(str(arrays.pop("summary"))), "params": arrays}


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
    single = run_sharded_steps(1, tmp_path / "one.npz")
    sharded = run_sharded_steps(4, tmp_path / "four.npz")
    assert (single["summary"]["devices"], sharded["summary"]["devices"]) == (1, 4)
    assert sorted(single["params"]) == sorted(sharded["params"])
    for name, value in single["params"].items():
        np.testing.assert_allclose(
            sharded["params"][name], value, rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(sharded["summary"]["losses"], single["summary"]["losses"], rtol=1e-5)
    one, four = single["summary"]["evaluation"], sharded["summary"]["evaluation"]
    assert one["count"] == four["count"] == 21
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
    assert four["accuracy"] == one["accuracy"]
    assert single["summary"]["error"] == ""
    assert "batch size 6 is not divisible by the 4 devices" in sharded["summary"]["error"]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def test_train_config_round_trips_through_json():
    config = loop_config(optimizer=train.OptimizerConfig(schedule="step", decay_epochs=(1, 2)))
    restored = train_job.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    with pytest.raises(ValueError, match="no fields"):
        train_job.TrainConfig.from_dict({"modle": "lenet5"})


def test_train_and_evaluate_logs_and_counts_whole_splits(tmp_path):
    result = train_job.train_and_evaluate(loop_config(), tmp_path, dataset=SyntheticDataset())
    assert result["step"] == 8
    assert result["validation"]["count"] == result["test"]["count"] == 24
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    evals = [(r["step"], r["split"]) for r in records if r["kind"] == "eval"]
    assert train_steps == [2, 4, 6, 8]
    assert evals == [(4, "validation"), (8, "validation"), (8, "test")]
    assert all({"epoch", "time", "elapsed_s"} <= set(r) for r in records)
    assert Checkpoints(tmp_path / "checkpoints" / "train").latest_step() == 8


def test_non_finite_loss_stops_without_saving_it(tmp_path):
    # 4 steps per epoch; the NaN enters at epoch 1, batch 2: global step 7.
    dataset = SyntheticDataset(nan_at=(1, 2))
    with pytest.raises(FloatingPointError, match=r"at step 7.*step 6.*learning rate"):
        train_job.train_and_evaluate(loop_config(), tmp_path, dataset=dataset)
    variables, meta = train_job.latest_variables(tmp_path)
    assert meta["step"] == 6
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables["params"]))


def test_init_from_a_model_of_other_classes_keeps_the_fresh_head(tmp_path):
    """A pretrained model fine-tuned on a dataset with another class count: every layer but
    the head comes from the file, the head keeps its new initialisation."""
    from jaxprune import checkpoint
    from jaxprune.models import build_model, widths_from_params

    x = jnp.zeros((1, 28, 28, 1))
    pretrained = build_model("lenet5", 7, TINY_LENET)
    variables = pretrained.init(jax.random.key(5), x)
    path = checkpoint.save_model_file(
        tmp_path / "pretrained.msgpack", model_name="lenet5", num_classes=7,
        widths=widths_from_params(variables["params"]), variables=variables,
        meta={}, input_shape=(28, 28, 1),
    )  # fmt: skip
    module = build_model("lenet5", 10, TINY_LENET)
    tx = train.make_optimizer(train.OptimizerConfig(learning_rate=0.01), 1, 1.0)
    state = train.create_train_state(module, tx, jax.random.key(0), x)
    started = train_job._start_from_file(state, str(path), ("head",))
    for layer, value in started.params.items():
        expected = state.params[layer] if layer == "head" else variables["params"][layer]
        chex.assert_trees_all_equal(value, expected)
    with pytest.raises(ValueError, match="name in init_fresh the layers to initialise anew"):
        train_job._start_from_file(state, str(path))
    with pytest.raises(ValueError, match=r"init_fresh names \['logits'\]"):
        train_job._start_from_file(state, str(path), ("logits",))
    with pytest.raises(ValueError, match="needs init_from"):
        loop_config(init_fresh=("head",)).check()
