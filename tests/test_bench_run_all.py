"""The one-command benchmark (experiments/bench/run_all.py) on its quick path: rows and JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

EXPECTED_MEASURES = [
    "train step ms, b8",
    "inference images/s, b1",
    "inference images/s, b8",
    "oracle s, all channels, 16 images",
    "taylor pass ms, b8",
    "graph + surgery s, 50% L1, prune verify=True (default)",
    "graph + surgery s, 50% L1, verify=False",
    "graph + surgery s, 50% L1, first call in process, verify=True",
    "pruned 50% speed-up, b1",
    "pruned 50% speed-up, b8",
]
PEER_MEASURES = {
    "torch": ["train step ms, b8", "inference images/s, b1", "inference images/s, b8"],
    "torch_pruning": [m for m in EXPECTED_MEASURES if m.startswith("graph + surgery")],
}


def quick_run(out: Path, use_peers: bool) -> dict:
    """`python -m experiments.bench --quick` in its own process (PyTorch and XLA never share
    one: both bring their own threading and allocator state), read back from its bench.json."""
    command = [sys.executable, "-m", "experiments.bench", "--quick", "--out", str(out)]
    if not use_peers:
        command.append("--no-peers")
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("use_peers", [True, False], ids=["peers-if-installed", "no-peers"])
def test_quick_run_has_every_row_and_key(tmp_path, use_peers):
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from experiments.bench import run_all
    finally:
        sys.path.remove(str(REPO_ROOT))
    result = quick_run(tmp_path / "bench", use_peers)
    present = result["peers"]
    assert set(present) == {"torch", "torch_pruning"}
    if not use_peers:
        assert present == {"torch": False, "torch_pruning": False}

    rows = result["rows"]
    assert all(tuple(row) == run_all.ROW_KEYS for row in rows)
    ours = [row["measure"] for row in rows if "Torch-Pruning" not in row["measure"]]
    assert ours == EXPECTED_MEASURES
    assert all(row["model"] == "lenet5" for row in rows if "graph" not in row["measure"])
    for row in rows:
        assert row["jaxprune"] > 0 and math.isfinite(row["jaxprune"])
    # Peer cells are numbers exactly when the peer ran, and a message says when it did not.
    for peer, measures in PEER_MEASURES.items():
        ran = present["torch"] and present[peer]
        cells = [row["reference"] for row in rows if row["measure"] in measures]
        assert all((cell is not None) == ran for cell in cells), (peer, cells)
    said = " ".join(result["skipped"])
    assert ("PyTorch not installed" in said) == (not present["torch"])
    assert ("torch_pruning not installed" in said) == (not present["torch_pruning"])
    tp_rows = [row for row in rows if "Torch-Pruning" in row["measure"]]
    assert len(tp_rows) == (2 if present["torch"] and present["torch_pruning"] else 0)
    # Ratios are the quotient of the two cells they name.
    for row in rows:
        if row["reference"] is not None and row["ratio_is"] != "speed-up":
            assert row["ratio"] == pytest.approx(row["jaxprune"] / row["reference"])

    assert result["command"].startswith("python -m experiments.bench --quick")
    assert result["machine"]["cpus"] == os.cpu_count()
    table, record = tmp_path / "bench" / "bench.md", tmp_path / "bench" / "bench.json"
    stored = json.loads(record.read_text())
    assert {"config", "peers", "skipped", "rows", "details", "machine", "command"} <= set(stored)
    assert {"train", "inference", "oracle", "taylor", "surgery", "speedup"} <= set(
        stored["details"]
    )
    lines = [line for line in table.read_text().splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(rows)  # header + one line per row
