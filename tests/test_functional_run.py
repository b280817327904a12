"""The functional method's runner (`jaxprune prune --method functional`): output, kill and resume.

Run as a script (``python tests/test_functional_run.py WORKDIR``) it prunes the shipped LeNet-5
on a tiny Fashion-MNIST subset and writes WORKDIR/result.json and WORKDIR/final.npz; the kill
test runs it twice, once killed (SIGKILL) after the first layer's images were checkpointed.
Every layer's images wait `LAYER_DELAY_S` before they start, killed or not, so that the kill
lands between checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest
from kill_resume import REPO_ROOT, kill_and_resume, save_variables

from jaxprune import checkpoint, data
from jaxprune.commands import reporting, run_functional
from jaxprune.criteria.functionality import VisualizationConfig
from jaxprune.methods import functional
from jaxprune.methods.functional import FunctionalConfig
from jaxprune.runtime import enable_compilation_cache

LENET = REPO_ROOT / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"
LAYER_DELAY_S = 1.0


def small_config(**changes) -> FunctionalConfig:
    config = FunctionalConfig(
        ratio=0.5,
        visualization=VisualizationConfig(steps=8, step_size=0.1),
        score_examples=64,
        batch_size=64,
    )
    return dataclasses.replace(config, **changes)


def tiny_dataset(train_examples: int = 320) -> data.Dataset:
    return data.load(
        data.DataConfig(train_examples=train_examples, validation_examples=128, test_examples=128)
    )


def main(workdir: str) -> None:
    enable_compilation_cache()
    images = functional.maximization_images

    def delayed(*args, **kwargs):
        time.sleep(LAYER_DELAY_S)
        return images(*args, **kwargs)

    functional.maximization_images = delayed  # this process only
    model, variables, _ = checkpoint.load_model_file(LENET)
    report = run_functional.run(
        small_config(), "lenet5", model, variables, tiny_dataset(), Path(workdir), progress=False
    )
    _, final, _ = checkpoint.load_model_file(Path(workdir) / "pruned.msgpack")
    save_variables(Path(workdir, "final.npz"), final)
    Path(workdir, "result.json").write_text(json.dumps(report, default=float))


def test_run_writes_a_loadable_pruned_model_with_its_report(tmp_path):
    model, variables, _ = checkpoint.load_model_file(LENET)
    dataset = tiny_dataset()
    config = small_config(finetune_epochs=1, finetune_lr=0.005)
    report = run_functional.run(
        config, "lenet5", model, variables, dataset, tmp_path, progress=False
    )
    assert set(report) == {"widths", "keep", "summary", "history"}
    assert report["widths"]["conv1"] == 3 and report["widths"]["conv2"] == 8
    assert {g: len(k) for g, k in report["keep"].items()} == {"conv1": 3, "conv2": 8}
    summary = report["summary"]
    assert summary["final"]["flops"] < summary["base"]["flops"]
    assert summary["layers"]["conv2"]["clusters"] == 8
    assert set(summary["before_finetune"]) == {"validation", "test"}
    small, tuned, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    assert meta["method"] == "functional" and meta["criterion"] == "taylor"
    again = reporting.measure(small.apply, tuned, dataset, batch_size=64)
    assert again["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    # A rerun finds everything done and reports the same.
    rerun = run_functional.run(
        config, "lenet5", model, variables, dataset, tmp_path, progress=False
    )
    assert rerun["keep"] == report["keep"]
    assert rerun["summary"]["test"] == summary["test"]
    with pytest.raises(ValueError, match="other settings"):
        run_functional.run(
            small_config(ratio=0.25), "lenet5", model, variables, dataset, tmp_path, progress=False
        )


def test_flags_name_functional_config_fields():
    for flag, (kind, help_text, paths) in run_functional.FLAGS.items():
        assert kind in (int, float, str) and help_text
        for path in paths:
            head, *rest = path.split(".")
            assert head == "functional", flag
            value = FunctionalConfig()
            for field in rest:
                assert field in {f.name for f in dataclasses.fields(value)}, path
                value = getattr(value, field)


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    command = [sys.executable, str(Path(__file__).resolve())]
    _, killed_at, _ = kill_and_resume(command, tmp_path, "functionality", what="layer checkpoint")
    assert killed_at == [1], "killed after the first layer's images"


if __name__ == "__main__":
    main(sys.argv[1])
