"""Reads TensorBoard event files (TFRecord framing, Event protos) without TensorBoard."""

import struct
from pathlib import Path

from jaxprune.metrics import _summary_writer_class

_summary_writer_class()  # loads tensorboardX with PyTorch hidden, as the writer does
from tensorboardX.proto import event_pb2  # noqa: E402


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under `logdir`: tag -> [(step, value), ...]."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            start = offset + 12
            if start + length + 4 > len(data):
                break  # a record still being written
            event = event_pb2.Event.FromString(data[start : start + length])
            offset = start + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found
