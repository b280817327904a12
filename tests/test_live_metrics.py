"""A prune run can be watched while it goes: JSON lines and TensorBoard events appear during
the run; iterative progress has a total toward its target; waiting for a person is no work."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tb_events import scalars
from tqdm import tqdm

from jaxprune.methods.iterative import IterativeConfig, _estimated_steps
from jaxprune.methods.progressive import exclude_from_eta

TESTS_DIR = Path(__file__).resolve().parent


def history(*remaining_channels: float) -> list[dict]:
    return [
        {"step": i + 1, "remaining": {"flops": 1.0, "macs": 1.0, "params": 1.0, "channels": c}}
        for i, c in enumerate(remaining_channels)
    ]


def test_the_iterative_total_is_extrapolated_to_the_first_target():
    config = IterativeConfig(target_channels=0.5, target_flops=None, max_steps=None)
    assert _estimated_steps(config, []) is None  # nothing known yet
    # 10% of the channels a step: 5 steps to 50%.
    assert _estimated_steps(config, history(0.9)) == 5
    assert _estimated_steps(config, history(0.9, 0.8)) == 5
    # max_steps caps it, and the total never falls below the steps taken.
    assert _estimated_steps(IterativeConfig(target_channels=0.5, max_steps=3), history(0.9)) == 3
    assert _estimated_steps(IterativeConfig(target_channels=0.5), history(0.99, 0.98)) == 50
    both = IterativeConfig(target_channels=0.1, target_flops=0.8)
    steps = history(0.9)
    steps[0]["remaining"]["flops"] = 0.95
    assert _estimated_steps(both, steps) == 4  # FLOPs reach 80% first (5% a step)


def test_time_spent_waiting_is_taken_out_of_the_eta():
    bar = tqdm(total=4, file=io.StringIO(), mininterval=0)
    bar.update(1)
    elapsed = bar.format_dict["elapsed"]
    exclude_from_eta(bar, 30.0)
    assert bar.format_dict["elapsed"] == pytest.approx(elapsed - 30.0, abs=0.5)
    quiet = tqdm(total=4, disable=True)
    exclude_from_eta(quiet, 30.0)  # a disabled bar has no clock to move
    bar.close()


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return records


@pytest.mark.slow
def test_a_prune_run_writes_json_lines_and_tensorboard_events_while_it_runs(tmp_path):
    from test_prune_methods import DATA, USER_MODEL

    model_file = tmp_path / "small_cnn.py"
    model_file.write_text(USER_MODEL)
    workdir = tmp_path / "run"
    argv = [
        sys.executable, "-m", "jaxprune.cli", "prune", "--method=iterative",
        f"--model={model_file}:make_cnn", f"--workdir={workdir}", "--no-progress", *DATA,
        "--iterative.target-channels=0.3", "--iterative.channels-per-step=1",
        "--iterative.updates-per-step=2", "--iterative.batch-size=32",
        "--iterative.eval-examples=64",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, cwd=TESTS_DIR.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    logs = workdir / "iterative"
    seen_jsonl, seen_events = [], {}
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            records = [r for r in read_records(logs / "metrics.jsonl") if r["kind"] == "prune"]
            events = scalars(logs / "tensorboard") if (logs / "tensorboard").exists() else {}
            if len(records) >= 3 and len(events.get("prune/channels_left", [])) >= 2:
                seen_jsonl, seen_events = records, events
                break
            time.sleep(0.2)
        running = process.poll() is None
    finally:
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()[-2000:]
    # Both logs were read while the run was still going.
    assert running and len(seen_jsonl) >= 3 and seen_events
    first = seen_jsonl[0]
    assert first["step"] == 1 and first["removed"] == 1 and 0 < first["channels_left"] < 1
    # At the end: every pruning step once, the channels falling, then the result.
    final = read_records(logs / "metrics.jsonl")
    pruning = [r for r in final if r["kind"] == "prune"]
    assert [r["step"] for r in pruning] == list(range(1, len(pruning) + 1))
    left = [r["channels_left"] for r in pruning]
    assert left == sorted(left, reverse=True) and left[-1] <= 0.3 + 1e-9
    assert final[-1]["kind"] == "result" and final[-1]["step"] == len(pruning) + 1
    steps = [step for step, _ in scalars(logs / "tensorboard")["prune/channels_left"]]
    assert steps == [r["step"] for r in pruning]
