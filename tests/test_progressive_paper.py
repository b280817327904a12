"""The paper-scale progressive config (VGG-16 on CIFAR-10) runs a few updates on mock data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import tensorflow_datasets as tfds

from jaxprune import checkpoint
from jaxprune.cli import load_config
from jaxprune.commands.prune import run_job
from jaxprune.models import build_model, widths_from_params

REPO_ROOT = Path(__file__).resolve().parent.parent


def narrow_vgg16_file(path: Path) -> Path:
    widths = {f"conv{i}": 4 for i in range(1, 14)} | {"fc1": 8, "fc2": 8}
    model = build_model("vgg16", 10, widths)
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    return checkpoint.save_model_file(
        path,
        model_name="vgg16",
        num_classes=10,
        widths=widths_from_params(variables["params"]),
        variables=variables,
        meta={},
        input_shape=x.shape[1:],
    )


def test_the_paper_config_runs_a_few_updates_on_mock_cifar10(tmp_path):
    job = load_config(REPO_ROOT / "experiments" / "progressive_vgg16_cifar10.py")
    assert job.method == "progressive"
    settings = job.progressive
    assert job.model == "vgg16" and job.data.name == "cifar10"
    assert settings.criterion == "oracle_loss" and settings.ratio == 0.05
    assert settings.batch_size == 8 and settings.retrain_epochs == 1
    assert settings.nesterov and settings.momentum == 0.9 and settings.loss == "mse"
    assert settings.learning_rates == ((0, 1e-5), (1, 1e-6), (3, 1e-7), (6, 1e-8))
    tiny = dataclasses.replace(
        job,
        model_file=str(narrow_vgg16_file(tmp_path / "base.msgpack")),
        data=dataclasses.replace(job.data, data_dir=str(tmp_path / "data"), validation_size=8),
        progressive=dataclasses.replace(
            settings,
            count=1,
            layers=("conv1", "conv13"),
            score_examples=8,
            retrain_examples=8,
            eval_examples=8,
            sample_images=4,
            progress=False,
        ),
    )
    with tfds.testing.mock_data(num_examples=16):
        report = run_job(tiny, tmp_path / "run", progress=False)
    assert [r["group"] for r in report["history"]] == ["conv1", "conv13"]
    assert [r["target_group"] for r in report["history"]] == ["conv2", "fc1"]
    assert report["widths"]["conv1"] == report["widths"]["conv13"] == 3
    assert (tmp_path / "run" / "pruned.msgpack").is_file()
    assert (tmp_path / "run" / "result.json").is_file()
