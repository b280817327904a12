"""Progressive simplification killed (SIGKILL) after a layer resumes and ends bit-identical."""

from __future__ import annotations

import signal
import sys

from kill_resume import TESTS_DIR, assert_same_result, kill_when, numbered_entries, run_through


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    command = [sys.executable, str(TESTS_DIR / "progressive_run.py")]
    run_through([*command, str(whole)])

    returncode = kill_when(
        [*command, str(resumed)], lambda: numbered_entries(resumed / "checkpoints")
    )
    assert returncode == -signal.SIGKILL
    assert not (resumed / "result.json").exists(), "the run finished before it was killed"
    killed_at = numbered_entries(resumed / "checkpoints")

    run_through([*command, str(resumed)])
    expected = assert_same_result(whole, resumed)
    # Two layers and the final fine-tuning: checkpoints 1, 2 and 3; the kill came before 3.
    assert max(killed_at) < 3 and numbered_entries(whole / "checkpoints")[-1] == 3
    assert [r["group"] for r in expected["history"]] == ["conv1", "conv2"]
    assert expected["summary"]["finetune"]["reinit_head"] is True
