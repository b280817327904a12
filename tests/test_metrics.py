"""Live metrics: JSON lines and TensorBoard events, readable while the run goes, and each step
once after a resume."""

import json
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
