"""Data passes over several devices equal one device: the criteria, the oracle, fine-tuning."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from core_helpers import simulated_devices_env

from jaxprune.sharding import default_mesh, make_mesh, place_batch

TESTS_DIR = Path(__file__).resolve().parent


def run_passes(devices: int, out_path: Path) -> tuple[dict, dict]:
    env = simulated_devices_env(devices)
    subprocess.run(
        [sys.executable, str(TESTS_DIR / "sharded_passes.py"), str(out_path)],
        check=True,
        env=env,
        cwd=TESTS_DIR.parent,
        timeout=600,
    )
    with np.load(out_path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    return json.loads(str(arrays.pop("summary"))), arrays


@pytest.mark.slow
def test_every_criterion_and_fine_tuning_on_four_devices_match_one(tmp_path):
    one, single = run_passes(1, tmp_path / "one.npz")
    four, sharded = run_passes(4, tmp_path / "four.npz")
    assert (one["devices"], four["devices"]) == (1, 4)
    # Batches of 8 are split 2 per device; the batch of 6 runs whole on every device.
    assert four["rows_per_device"] == [[2], [2], [6]] and one["rows_per_device"] == [[8], [8], [6]]
    assert sorted(single) == sorted(sharded)
    scored = {key.split("/")[1] for key in single if key.startswith("score/")}
    # Every criterion that reads data was run (the weight criteria too, trivially).
    assert {"taylor", "oracle_loss", "oracle_abs", "activation_std", "apoz", "hrank"} <= scored
    for key, value in single.items():
        np.testing.assert_allclose(sharded[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)


def test_one_device_leaves_batches_where_they_are():
    batch = {"image": np.zeros((3, 2)), "label": np.zeros(3)}
    assert place_batch(batch, None) is batch
    assert place_batch(batch, make_mesh(jax.local_devices()[:1])) is batch
    if jax.local_device_count() == 1:
        assert default_mesh() is None
    with pytest.raises(ValueError, match="disagree on the batch size"):
        place_batch({"image": np.zeros((3, 2)), "label": np.zeros(2)}, make_mesh())


def prune_on_devices(devices: int, method: str, model_file: Path, workdir: Path) -> dict:
    """`jaxprune prune` of a tiny run in a fresh process with `devices` simulated devices."""
    from test_prune_methods import prune_argv

    env = simulated_devices_env(devices)
    argv = prune_argv(method, f"{model_file}:make_cnn", workdir)
    subprocess.run(
        [sys.executable, "-m", "jaxprune.cli", *argv],
        check=True,
        env=env,
        cwd=TESTS_DIR.parent,
        timeout=600,
        capture_output=True,
    )
    return json.loads((workdir / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["oneshot", "iterative", "progressive", "blending", "functional"]
)
def test_every_method_on_four_devices_matches_one(tmp_path, method):
    from test_prune_methods import USER_MODEL

    from jaxprune.commands.prune import load_pruned

    model_file = tmp_path / "small_cnn.py"
    model_file.write_text(USER_MODEL)
    one = prune_on_devices(1, method, model_file, tmp_path / "one")
    four = prune_on_devices(4, method, model_file, tmp_path / "four")
    assert len(one["devices"]) == 1 and len(four["devices"]) == 4
    assert four["keep"] == one["keep"]
    for model in ("base", "pruned"):
        for split in ("validation", "test"):
            a, b = one["metrics"][model][split], four["metrics"][model][split]
            assert a["count"] == b["count"]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
            assert abs(b["accuracy"] - a["accuracy"]) <= 1 / a["count"]
    _, single, _ = load_pruned(tmp_path / "one" / "pruned.msgpack")
    _, sharded, _ = load_pruned(tmp_path / "four" / "pruned.msgpack")
    leaves_one = jax.tree_util.tree_leaves_with_path(single)
    leaves_four = dict(jax.tree_util.tree_leaves_with_path(sharded))
    for path, value in leaves_one:
        np.testing.assert_allclose(
            leaves_four[path], value, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_processes(argv: list[str], processes: int, devices: int, timeout: int = 600) -> None:
    """`argv` in `processes` local processes of `devices` simulated CPU devices each, joined
    through JAX's distributed runtime (gloo collectives)."""
    env = simulated_devices_env(
        devices,
        JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}",
        JAXPRUNE_NUM_PROCESSES=str(processes),
    )
    running = [
        subprocess.Popen(
            argv,
            env=dict(env, JAXPRUNE_PROCESS_ID=str(index)),
            cwd=TESTS_DIR.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for index in range(processes)
    ]
    outputs = [process.communicate(timeout=timeout)[0].decode() for process in running]
    for index, process in enumerate(running):
        assert process.returncode == 0, f"process {index}:\n{outputs[index][-3000:]}"


@pytest.mark.slow
def test_two_processes_of_two_devices_match_one_device(tmp_path):
    """Scores of every criterion, a fine-tuning, and the kept channels and final variables of
    one-shot and blending pruning: each of 2 processes (2 devices each) gets the 1-device run's
    numbers."""
    _, single = run_passes(1, tmp_path / "one.npz")
    run_processes([sys.executable, str(TESTS_DIR / "sharded_passes.py"), str(tmp_path / "two")],
                  processes=2, devices=2)  # fmt: skip
    for index in range(2):
        with np.load(tmp_path / f"two.{index}.npz") as saved:
            arrays = {name: saved[name] for name in saved.files}
        summary = json.loads(str(arrays.pop("summary")))
        assert (summary["processes"], summary["devices"]) == (2, 4)
        assert summary["rows_per_device"] == [[2], [2], [6]]
        assert sorted(arrays) == sorted(single)
        assert any(key.startswith("blending/keep/") for key in arrays)
        for key, value in single.items():
            np.testing.assert_allclose(arrays[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_the_prune_command_in_two_processes_matches_one(tmp_path):
    """`jaxprune --distributed prune` in 2 processes sharing a workdir: one writer, the same
    report and model file as one process, and the same command again reports the finished
    run."""
    from test_prune_methods import USER_MODEL, prune_argv

    from jaxprune.commands.prune import load_pruned

    model_file = tmp_path / "small_cnn.py"
    model_file.write_text(USER_MODEL)
    one = prune_on_devices(1, "oneshot", model_file, tmp_path / "one")
    argv = [sys.executable, "-m", "jaxprune.cli", "--distributed",
            *prune_argv("oneshot", f"{model_file}:make_cnn", tmp_path / "two")]  # fmt: skip
    run_processes(argv, processes=2, devices=2)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert len(two["devices"]) == 4 and two["keep"] == one["keep"]
    for model in ("base", "pruned"):
        for split in ("validation", "test"):
            a, b = one["metrics"][model][split], two["metrics"][model][split]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["accuracy"] == a["accuracy"]
    _, single, _ = load_pruned(tmp_path / "one" / "pruned.msgpack")
    _, double, _ = load_pruned(tmp_path / "two" / "pruned.msgpack")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(single),
                            jax.tree_util.tree_leaves(double), strict=True):  # fmt: skip
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    records = (tmp_path / "two" / "oneshot" / "metrics.jsonl").read_text().splitlines()
    assert len({json.loads(line)["step"] for line in records}) == len(records)  # one writer
    # Resumed in two processes: the finished run is reported, nothing recomputed.
    run_processes(argv, processes=2, devices=2)
    assert json.loads((tmp_path / "two" / "result.json").read_text()) == two


@pytest.mark.slow
def test_a_locked_workdir_stops_every_process_with_the_same_error(tmp_path):
    """Only the first process locks the workdir; when it cannot, the others must not wait for
    it: every process stops with the lock's message."""
    import fcntl

    from test_prune_methods import USER_MODEL, prune_argv

    from jaxprune.run import LOCK_FILE

    model_file = tmp_path / "small_cnn.py"
    model_file.write_text(USER_MODEL)
    workdir = tmp_path / "busy"
    workdir.mkdir()
    argv = [sys.executable, "-m", "jaxprune.cli", "--distributed",
            *prune_argv("oneshot", f"{model_file}:make_cnn", workdir)]  # fmt: skip
    env = simulated_devices_env(
        1, JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAXPRUNE_NUM_PROCESSES="2"
    )
    with (workdir / LOCK_FILE).open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another run holds it
        running = [
            subprocess.Popen(argv, env=dict(env, JAXPRUNE_PROCESS_ID=str(i)),
                             cwd=TESTS_DIR.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in range(2)
        ]  # fmt: skip
        errors = [process.communicate(timeout=300)[1].decode() for process in running]
    for process, error in zip(running, errors, strict=True):
        assert process.returncode == 1, error[-2000:]
        assert "is in use by another jaxprune process" in error


@pytest.mark.slow
def test_each_process_reads_only_its_rows_of_every_batch(tmp_path):
    """2 processes of 2 devices each: of every batch that splits over the 4 devices, a process
    reads from storage only the half its devices hold; a batch that does not split (6 rows) is
    read whole by both. Every batch, gathered, equals the batch one process reads."""
    script = str(TESTS_DIR / "process_reading.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one")], check=True,
                   env=simulated_devices_env(1), cwd=TESTS_DIR.parent, timeout=300)  # fmt: skip
    run_processes([sys.executable, script, str(tmp_path / "two")], processes=2, devices=2)
    with np.load(tmp_path / "one.npz") as saved:
        single = {name: saved[name] for name in saved.files}
    assert json.loads(str(single.pop("summary")))["train_reads"] == [8, 8, 4]
    for index in range(2):
        with np.load(tmp_path / f"two.{index}.npz") as saved:
            arrays = {name: saved[name] for name in saved.files}
        summary = json.loads(str(arrays.pop("summary")))
        assert (summary["processes"], summary["devices"]) == (2, 4)
        assert summary["train_reads"] == [4, 4, 2]
        assert summary["validation_reads"] == [4, 6]
        assert summary["train_kinds"] == ["ArrayImpl"] * 3  # global arrays on the mesh
        assert sorted(arrays) == sorted(single)
        for key, value in single.items():
            np.testing.assert_array_equal(arrays[key], value, err_msg=key)


TRAIN_ARGV = [
    "train",
    "--no-progress",
    "--set=model=lenet5",
    '--set=widths={"conv1": 2, "conv2": 4, "fc1": 8, "fc2": 8}',
    "--set=data.train_examples=64",
    "--set=data.validation_examples=30",
    "--set=data.test_examples=30",
    "--set=data.batch_size=16",
    "--set=epochs=1",
    "--set=eval_batch_size=12",
    "--set=checkpoint_every_steps=2",
]


@pytest.mark.slow
def test_jaxprune_train_in_two_processes_matches_one(tmp_path):
    """`jaxprune --distributed train`: each process reads its half of each batch, orbax
    checkpoints from both, one writer of the metrics; the exported model and every evaluation
    equal one process (evaluation batches of 12 split, the last of 6 runs whole)."""
    from jaxprune.checkpoint import load_model_file

    def argv(name: str) -> list[str]:
        workdir = tmp_path / name
        return [*TRAIN_ARGV, f"--workdir={workdir}", f"--export={workdir / 'model.msgpack'}"]

    subprocess.run([sys.executable, "-m", "jaxprune.cli", *argv("one")], check=True,
                   env=simulated_devices_env(1), cwd=TESTS_DIR.parent, timeout=300,
                   capture_output=True)  # fmt: skip
    run_processes([sys.executable, "-m", "jaxprune.cli", "--distributed", *argv("two")],
                  processes=2, devices=2)  # fmt: skip
    _, one, _ = load_model_file(tmp_path / "one" / "model.msgpack")
    _, two, _ = load_model_file(tmp_path / "two" / "model.msgpack")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one),
                            jax.tree_util.tree_leaves(two), strict=True):  # fmt: skip
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    records = {
        name: [
            json.loads(line)
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("one", "two")
    }
    evaluations = {n: [r for r in rs if r["kind"] == "eval"] for n, rs in records.items()}
    assert len(evaluations["two"]) == len(evaluations["one"]) >= 1
    for a, b in zip(evaluations["one"], evaluations["two"], strict=True):
        assert b["accuracy"] == a["accuracy"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert len(records["two"]) == len(records["one"])  # written once, by the first process
