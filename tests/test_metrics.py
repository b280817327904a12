"""Live metrics: JSON lines and TensorBoard events, readable while the run goes, and each step
once after a resume."""

import json
import subprocess
import sys
import time

from tb_events import scalars

from jaxprune.metrics import MetricsWriter


def test_records_reach_json_lines_and_tensorboard_as_they_are_written(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, "train", loss=2.5, accuracy=0.25, note="text is not a scalar")
    writer.write(2, "train", loss=2.0, accuracy=0.5, cost={"macs": 10.0})
    # Read while the writer is still open, as a person watching the run would.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [2.5, 2.0]
    deadline = time.time() + 10  # the event file is flushed every second
    while len(scalars(tmp_path / "tensorboard").get("train/loss", [])) < 2:
        assert time.time() < deadline, "the events never reached the file"
        time.sleep(0.2)
    board = scalars(tmp_path / "tensorboard")
    assert board["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert board["train/cost/macs"] == [(2, 10.0)]
    assert "train/note" not in board
    writer.close()


def test_a_resumed_run_writes_each_step_once(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.write(step, loss=float(step))
    with MetricsWriter(tmp_path, resumed_step=2) as writer:
        writer.write(3, loss=30.0)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    with MetricsWriter(tmp_path) as writer:  # a fresh run starts a fresh log
        writer.write(1, loss=5.0)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_writing_metrics_does_not_load_pytorch_into_the_process(tmp_path):
    # tensorboardX imports torch when it can; in a JAX process that state crashed later
    # compiles. A fresh interpreter, so that no other test's imports count.
    script = (
        "import sys, jaxprune.metrics as m\n"
        f"w = m.MetricsWriter({str(tmp_path)!r}); w.write(1, loss=0.5); w.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
