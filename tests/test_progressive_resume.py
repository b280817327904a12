"""Progressive simplification killed (SIGKILL) after a layer resumes and ends bit-identical.

The slow tier (a real kill of a fresh interpreter); the default tier resumes in process
(tests/test_progressive.py).
"""

from __future__ import annotations

import sys

import pytest
from kill_resume import TESTS_DIR, kill_and_resume, numbered_entries


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    command = [sys.executable, str(TESTS_DIR / "progressive_run.py")]
    expected, killed_at, whole = kill_and_resume(command, tmp_path, "checkpoints/layers")
    # One checkpoint per layer (1, 2) and one after the final fine-tuning (3); the kill came
    # before the last.
    assert max(killed_at) < 3 and numbered_entries(whole / "checkpoints" / "layers")[-1] == 3
    assert [r["group"] for r in expected["history"]] == ["conv1", "conv2"]
    assert [len(r["removed"]) for r in expected["history"]] == [1, 4]
    finetune = expected["summary"]["method"]["finetune"]
    assert finetune["reinit"] == "dense" and finetune["reinitialised"] == ["fc1", "fc2", "head"]
