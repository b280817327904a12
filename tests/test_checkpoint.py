"""Tests of jaxprune.checkpoint: round trips, refusals, model files and kill-and-resume."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from kill_resume import kill_when, numbered_entries, run_through

from jaxprune import checkpoint, data, train, train_job
from jaxprune.models import build_model, widths_from_params
from jaxprune.run import RunMismatchError

# When one array of a corrupted checkpoint fails to load, orbax abandons the reads of the
# others on its background event loop; they end after the loop is closed, during whichever test
# runs then, and Python reports them as unraisable exceptions and coroutines never awaited.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
TINY_LENET = {"conv1": 2, "conv2": 4, "fc1": 8, "fc2": 8}
OPTIMIZER = train.OptimizerConfig(learning_rate=0.05, weight_decay=5e-4, schedule="cosine")
SPEC = checkpoint.RunSpec(
    model_name="lenet5",
    num_classes=10,
    input_shape=(28, 28, 1),
    optimizer=OPTIMIZER,
    steps_per_epoch=10,
    epochs=2,
)


def trained_state(widths=TINY_LENET, masks=None) -> train.TrainState:
    """A LeNet-5 state two steps in, so that momentum, batch stats and rng are not initial."""
    model = build_model("lenet5", 10, widths)
    tx = train.make_optimizer(OPTIMIZER, SPEC.steps_per_epoch, SPEC.epochs)
    state = train.create_train_state(
        model, tx, jax.random.key(3), jnp.zeros((1, 28, 28, 1)), masks=masks
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    for _ in range(2):
        state, _ = train.train_step(state, batch)
    return state


@pytest.fixture(scope="module")
def state() -> train.TrainState:
    return trained_state()


def save_one(directory: Path, state: train.TrainState, **kwargs) -> Path:
    manager = checkpoint.open_checkpoints(directory)
    path = checkpoint.save_checkpoint(manager, state, SPEC, **kwargs)
    manager.wait_until_finished()
    manager.close()
    return path


def assert_states_equal(got: train.TrainState, expected: train.TrainState) -> None:
    """Every array leaf (params, batch_stats, opt_state, step, rng, masks) is bit-identical."""
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert [path for path, _ in got_leaves] == [path for path, _ in expected_leaves]
    for (path, a), (_, b) in zip(got_leaves, expected_leaves, strict=True):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_is_bit_identical(tmp_path, state):
    history = [{"step": 2, "accuracy": 0.5}]
    save_one(tmp_path, state, config={"epochs": 2}, history=history, extra={"keep": [0, 1]})
    restored = checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path))
    assert_states_equal(restored.state, state)
    assert int(restored.state.step) == 2
    assert restored.meta["history"] == history
    assert restored.meta["extra"] == {"keep": [0, 1]}
    assert restored.meta["config"] == {"epochs": 2}
    assert restored.meta["widths"] == {**TINY_LENET, "head": 10}
    assert restored.meta["rng"] == np.asarray(state.rng).tolist()
    # The restored state trains on: its static apply_fn and tx come from the rebuilt spec.
    assert restored.model.default_widths()["conv1"] == 6  # the zoo default, not the spec
    assert widths_from_params(restored.state.params)["conv1"] == 2
    batch = {"image": np.ones((2, 28, 28, 1), np.float32), "label": np.zeros(2, np.int32)}
    stepped_restored, _ = train.train_step(restored.state, batch)
    stepped_original, _ = train.train_step(state, batch)
    chex.assert_trees_all_equal(stepped_restored.params, stepped_original.params)


def test_masks_round_trip(tmp_path):
    masks = {"conv1": jnp.array([1.0, 0.0]), "conv2": jnp.array([1.0, 1.0, 0.0, 1.0])}
    state = trained_state(masks=masks)
    save_one(tmp_path, state)
    restored = checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path))
    assert_states_equal(restored.state, state)
    chex.assert_trees_all_equal(restored.state.masks, masks)


def test_keeps_the_latest_checkpoints_and_saves_a_step_once(tmp_path, state):
    manager = checkpoint.open_checkpoints(tmp_path, max_to_keep=2)
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(manager, state.replace(step=jnp.asarray(step)), SPEC)
        manager.wait_until_finished()
    assert manager.all_steps() == [3, 4]
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        checkpoint.save_checkpoint(manager, state.replace(step=jnp.asarray(4)), SPEC)
    manager.close()
    restored = checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path), step=3)
    assert int(restored.state.step) == 3


def test_missing_checkpoint_is_a_clear_error(tmp_path, state):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path))
    save_one(tmp_path, state)
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint of step 5.*\[2\]"):
        checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path), step=5)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_other_widths_are_refused_with_the_differences(tmp_path, state):
    path = save_one(tmp_path, state)
    model = build_model("lenet5", 10, {**TINY_LENET, "conv1": 3})
    tx = train.make_optimizer(OPTIMIZER, SPEC.steps_per_epoch, SPEC.epochs)
    target = checkpoint.abstract_train_state(model, tx, (28, 28, 1))
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path), target=target)
    message = str(caught.value)
    assert str(path) in message
    assert "params/conv1/kernel: stored float32[5, 5, 1, 2], expected float32[5, 5, 1, 3]" in (
        message
    )
    assert "another architecture" in message


def test_another_model_is_refused(tmp_path, state):
    save_one(tmp_path, state)
    model = build_model("vgg_small", 10)
    tx = train.make_optimizer(OPTIMIZER, SPEC.steps_per_epoch, SPEC.epochs)
    target = checkpoint.abstract_train_state(model, tx, (28, 28, 1))
    with pytest.raises(checkpoint.CheckpointError, match="expected but missing"):
        checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path), target=target)


def corrupt_files(directory: Path, how: str) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, f"no data files under {directory}"
    for file in files:
        if how == "delete":
            file.unlink()
        else:
            content = file.read_bytes()
            file.write_bytes(content[: len(content) // 2])


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_corrupted_arrays_are_refused(tmp_path, state, how):
    path = save_one(tmp_path, state)
    corrupt_files(path / "state", how)
    with pytest.raises(checkpoint.CheckpointError, match="corrupted or incomplete") as caught:
        checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path))
    assert str(path) in str(caught.value)


def meta_file(path: Path) -> Path:
    (found,) = [p for p in (path / "meta").iterdir() if p.name == "metadata"]
    return found


def test_truncated_meta_is_refused(tmp_path, state):
    path = save_one(tmp_path, state)
    file = meta_file(path)
    file.write_text(file.read_text()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable") as caught:
        checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path))
    assert str(path) in str(caught.value)


def test_arrays_that_differ_from_their_hash_are_refused(tmp_path, state):
    path = save_one(tmp_path, state)
    file = meta_file(path)
    meta = json.loads(file.read_text())
    meta["arrays"]["params/conv2/kernel"]["sha256"] = "0" * 64
    file.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupted(.|\n)*params/conv2/kernel"):
        checkpoint.restore_checkpoint(checkpoint.open_checkpoints(tmp_path))


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


def save_model(path: Path, state: train.TrainState, **overrides) -> Path:
    arguments = dict(
        model_name="lenet5",
        num_classes=10,
        widths=widths_from_params(state.params),
        variables=state.variables(),
        meta={"dataset": "fashion_mnist", "accuracy": 0.9},
        input_shape=(28, 28, 1),
    )
    arguments.update(overrides)
    return checkpoint.save_model_file(path, **arguments)


def test_model_file_round_trip(tmp_path, state):
    path = save_model(tmp_path / "models" / "lenet.msgpack", state)
    model, variables, meta = checkpoint.load_model_file(path)
    assert meta == {"dataset": "fashion_mnist", "accuracy": 0.9}
    # LeNet-5 has no BatchNorm: its variables are the params alone, as model.init makes them.
    assert set(variables) == {"params"}
    chex.assert_trees_all_equal(variables["params"], state.params)
    images = np.random.default_rng(1).normal(size=(3, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        model.apply(variables, images, train=False),
        state.apply_fn(state.variables(), images, train=False),
    )
    assert not list(path.parent.glob("*.tmp"))


def test_model_file_save_checks_its_arguments(tmp_path, state):
    with pytest.raises(ValueError, match="disagree with the params"):
        save_model(tmp_path / "a.msgpack", state, widths={**TINY_LENET, "head": 10, "fc1": 9})
    with pytest.raises(ValueError, match="input_shape"):
        save_model(tmp_path / "b.msgpack", state, input_shape=None)


def rewrite_payload(path: Path, change) -> None:
    payload = serialization.msgpack_restore(path.read_bytes())
    change(payload)
    path.write_bytes(serialization.msgpack_serialize(payload))


def test_model_file_of_another_architecture_is_refused(tmp_path, state):
    path = save_model(tmp_path / "lenet.msgpack", state)

    def claim_other_widths(payload):
        header = json.loads(payload["header"])
        header["widths"] = {**header["widths"], "conv2": 5}
        payload["header"] = json.dumps(header)

    rewrite_payload(path, claim_other_widths)
    with pytest.raises(checkpoint.CheckpointError, match=r"does not match(.|\n)*conv2/kernel"):
        checkpoint.load_model_file(path)


def test_corrupted_model_files_are_refused(tmp_path, state):
    truncated = save_model(tmp_path / "truncated.msgpack", state)
    content = truncated.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted"):
        checkpoint.load_model_file(truncated)

    altered = save_model(tmp_path / "altered.msgpack", state)

    def change_a_weight(payload):
        fc1 = payload["variables"]["params"]["fc1"]
        fc1["kernel"] = fc1["kernel"].copy()
        fc1["kernel"][0, 0] += 1.0

    rewrite_payload(altered, change_a_weight)
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupted(.|\n)*params/fc1/kernel"):
        checkpoint.load_model_file(altered)
    with pytest.raises(FileNotFoundError):
        checkpoint.load_model_file(tmp_path / "missing.msgpack")


# ---------------------------------------------------------------------------------------------
# Kill and resume
# ---------------------------------------------------------------------------------------------


def _load_training_script():
    """Imports tests/run_training.py, the script the subprocesses run, for its CONFIG."""
    spec = importlib.util.spec_from_file_location("run_training", TESTS_DIR / "run_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_training = _load_training_script()

FINAL_STEP = 60  # 640 examples / batch 32 = 20 steps per epoch, 3 epochs


def training_command(workdir: Path) -> list[str]:
    return [sys.executable, str(TESTS_DIR / "run_training.py"), str(workdir)]


def strip_times(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in ("time", "elapsed_s")} for e in entries]


def records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return strip_times([json.loads(line) for line in lines])


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An uninterrupted run, and a run killed after its first checkpoint then rerun."""
    root = tmp_path_factory.mktemp("resume")
    whole, resumed = root / "whole", root / "resumed"
    run_through(training_command(whole))
    checkpoints = resumed / "checkpoints" / "train"
    returncode = kill_when(training_command(resumed), lambda: numbered_entries(checkpoints))
    killed_at = numbered_entries(checkpoints)
    killed_result_exists = (resumed / "result.json").exists()

    run_through(training_command(resumed))
    return {
        "whole": whole,
        "resumed": resumed,
        "returncode": returncode,
        "killed_at": killed_at,
        "killed_result_exists": killed_result_exists,
    }


@pytest.mark.slow
def test_kill_and_resume_reaches_the_uninterrupted_params(killed_and_resumed):
    run = killed_and_resumed
    assert run["returncode"] == -signal.SIGKILL
    assert not run["killed_result_exists"], "the run finished before it was killed"
    assert run["killed_at"] and max(run["killed_at"]) < FINAL_STEP
    # A mid-epoch checkpoint: resuming must start inside an epoch (start_batch > 0).
    assert max(run["killed_at"]) % 20 != 0

    whole, whole_meta = train_job.latest_state(run["whole"])
    resumed, resumed_meta = train_job.latest_state(run["resumed"])
    assert int(whole["step"]) == int(resumed["step"]) == FINAL_STEP
    chex.assert_trees_all_equal(resumed, whole)  # params, statistics, momenta, rng
    assert strip_times(resumed_meta["history"]) == strip_times(whole_meta["history"])
    whole_result = json.loads((run["whole"] / "result.json").read_text())
    assert json.loads((run["resumed"] / "result.json").read_text()) == whole_result
    # metrics.jsonl holds each log step and evaluation once, with the same values.
    assert records(run["resumed"]) == records(run["whole"])
    assert whole_result["test"]["count"] == 128


@pytest.mark.slow
def test_another_run_in_the_workdir_is_refused_and_cosmetic_changes_resume(killed_and_resumed):
    config = train_job.TrainConfig.from_dict(run_training.CONFIG)
    dataset = data.load(config.data)
    workdir = killed_and_resumed["whole"]
    other_widths = train_job.TrainConfig.from_dict({**run_training.CONFIG, "widths": {"conv1": 4}})
    with pytest.raises(RunMismatchError, match=r"config.widths: None -> \{'conv1': 4\}"):
        train_job.train_and_evaluate(other_widths, workdir, dataset=dataset)
    other_model = train_job.TrainConfig.from_dict({**run_training.CONFIG, "model": "vgg_small"})
    with pytest.raises(RunMismatchError, match="config.model: 'lenet5' -> 'vgg_small'"):
        train_job.train_and_evaluate(other_model, workdir, dataset=dataset)
    other_batch = train_job.TrainConfig.from_dict(
        {**run_training.CONFIG, "data": {**run_training.CONFIG["data"], "batch_size": 64}}
    )
    with pytest.raises(RunMismatchError, match="config.data.batch_size: 32 -> 64"):
        train_job.train_and_evaluate(other_batch, workdir, dataset=dataset)
    # Fields that do not change the result (logging) resume the finished run, which just
    # re-reports its test.
    relogged = train_job.TrainConfig.from_dict({**run_training.CONFIG, "log_every_steps": 5})
    result = train_job.train_and_evaluate(relogged, workdir, dataset=dataset)
    assert result == json.loads((workdir / "result.json").read_text())


@pytest.mark.slow
def test_export_latest_writes_the_final_weights(killed_and_resumed, tmp_path):
    workdir = killed_and_resumed["whole"]
    path = train_job.export_latest(workdir, tmp_path / "lenet5.msgpack", meta={"note": "x"})
    model, variables, meta = checkpoint.load_model_file(path)
    assert meta["step"] == FINAL_STEP and meta["note"] == "x"
    assert meta["config"]["model"] == "lenet5"
    final, _ = train_job.latest_variables(workdir)
    chex.assert_trees_all_equal(variables["params"], final["params"])
    with pytest.raises(checkpoint.CheckpointError, match="no training checkpoint"):
        train_job.export_latest(tmp_path / "empty", tmp_path / "none.msgpack")


def test_tree_fingerprint_sees_values_shapes_dtypes_and_paths():
    import json

    from jaxprune.checkpoint import json_default, tree_fingerprint

    tree = {"a": np.arange(4, dtype=np.float32), "b": np.zeros((2, 2), np.float32)}
    same = {"a": np.arange(4, dtype=np.float32), "b": np.zeros((2, 2), np.float32)}
    assert tree_fingerprint(tree) == tree_fingerprint(same)
    changed = [
        {**tree, "a": np.nextafter(tree["a"], np.float32(9))},  # one ulp up
        {**tree, "b": np.zeros((4,), np.float32)},
        {**tree, "b": np.zeros((2, 2), np.float64)},
        {"c": tree["a"], "b": tree["b"]},
    ]
    assert len({tree_fingerprint(t) for t in changed} | {tree_fingerprint(tree)}) == 5
    assert json.loads(
        json.dumps({"x": np.float32(0.5), "y": np.arange(2)}, default=json_default)
    ) == {
        "x": 0.5,
        "y": [0, 1],
    }


def test_check_same_run_names_other_base_variables_and_changed_fields():
    config = {"ratio": 0.5, "optimizer": {"lr": 0.1}, "options": {"k": 1}, "progress": False}
    same = dict(stored_fingerprint="abc", fingerprint="abc", config_name="TheConfig")
    checkpoint.check_same_run("ckpt/3", stored_config=config, config=config, **same)
    # Ignored fields may change.
    cosmetic = {**config, "progress": True}
    checkpoint.check_same_run(
        "ckpt/3", stored_config=config, config=cosmetic, ignore=("progress",), **same
    )
    with pytest.raises(checkpoint.CheckpointError, match="other base variables"):
        checkpoint.check_same_run(
            "ckpt/3", **{**same, "stored_fingerprint": "xyz"}, stored_config=config, config=config
        )
    changed = {**config, "optimizer": {"lr": 0.2}, "options": {"k": 2}}
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"ckpt/3 was made with another TheConfig \(optimizer\.lr: 0\.1 -> 0\.2, "
        r"options\.k: 1 -> 2\)",
    ):
        checkpoint.check_same_run("ckpt/3", stored_config=config, config=changed, **same)
    with pytest.raises(checkpoint.CheckpointError, match=r"options: \{'k': 1\} -> \{'k': 2\}"):
        checkpoint.check_same_run(
            "ckpt/3", stored_config=config, config=changed, whole=("options",), **same
        )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_model_file_in_lower_precision_loads_in_its_precision(tmp_path, dtype):
    model = build_model("lenet5", 10, TINY_LENET)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
    low = jax.tree.map(lambda a: a.astype(dtype), variables)
    path = checkpoint.save_model_file(
        tmp_path / "low.msgpack",
        model_name="lenet5",
        num_classes=10,
        widths=widths_from_params(low["params"]),
        variables=low,
        meta={},
        input_shape=(28, 28, 1),
    )
    _, loaded, _ = checkpoint.load_model_file(path)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(low), strict=True):
        assert a.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
