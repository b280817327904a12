"""Progressive simplification killed (SIGKILL) after a layer resumes and ends bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def finished_layers(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, str(TESTS_DIR / "progressive_run.py")]
    subprocess.run([*command, str(whole)], check=True, cwd=REPO_ROOT, env=env, timeout=300)

    process = subprocess.Popen([*command, str(resumed)], cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 240
    while not finished_layers(resumed) and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint appeared within 240 s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (resumed / "result.json").exists(), "the run finished before it was killed"
    killed_at = finished_layers(resumed)

    subprocess.run([*command, str(resumed)], check=True, cwd=REPO_ROOT, env=env, timeout=300)
    expected = json.loads((whole / "result.json").read_text())
    got = json.loads((resumed / "result.json").read_text())
    # Two layers and the final fine-tuning: checkpoints 1, 2 and 3; the kill came before 3.
    assert max(killed_at) < 3 and finished_layers(whole)[-1] == 3
    assert got == expected
    assert [r["group"] for r in expected["history"]] == ["conv1", "conv2"]
    assert expected["summary"]["finetune"]["reinit_head"] is True
    with np.load(whole / "final.npz") as a, np.load(resumed / "final.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
