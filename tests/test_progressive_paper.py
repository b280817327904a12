"""The progressive experiment configs: the paper-scale one (VGG-16 on CIFAR-10) runs a few
updates on mock data, and the VGG-small one's settings, table and figure work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds
from core_helpers import load_experiment

from jaxprune import checkpoint
from jaxprune.methods.progressive import PAPER_LEARNING_RATES, progressive_prune
from jaxprune.model import Model
from jaxprune.models import build_model, widths_from_params

REPO_ROOT = Path(__file__).resolve().parent.parent


experiment = load_experiment


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


@pytest.mark.slow
def test_the_paper_config_runs_a_few_updates_on_mock_cifar10(tmp_path):
    paper = experiment("progressive_vgg16_cifar10")
    settings = paper.paper_config()
    settings.check()
    assert settings.criterion == "oracle_loss" and settings.ratio == 0.05
    assert settings.rounding == "floor" and settings.batch_norm == "frozen"
    assert settings.batch_size == 8 and settings.retrain_epochs == 1
    assert settings.nesterov and settings.momentum == 0.9 and settings.loss == "mse"
    assert settings.learning_rates == PAPER_LEARNING_RATES
    assert settings.learning_rates == ((0, 1e-5), (1, 1e-6), (3, 1e-7), (6, 1e-8))
    assert settings.complete_learning_rate == 1e-5
    assert (settings.final_finetune_epochs, settings.final_learning_rate) == (50, 1e-5)
    assert settings.final_reinit == "dense" and settings.final_batch_size == 8
    tiny = dataclasses.replace(
        settings,
        count=1,
        layers=("conv1", "conv13"),
        score_examples=8,
        retrain_examples=8,
        eval_examples=8,
        sample_images=4,
        final_finetune_epochs=1,
        final_examples=8,
    )
    data_config = dataclasses.replace(
        paper.DATA, data_dir=str(tmp_path / "data"), validation_size=8, batch_size=8
    )
    with tfds.testing.mock_data(num_examples=16):
        outcome = paper.run(
            str(narrow_vgg16_file(tmp_path / "base.msgpack")),
            str(tmp_path / "run"),
            tiny,
            data_config,
            progress=False,
        )
    result = outcome["result"]
    assert [r["group"] for r in result.history] == ["conv1", "conv13"]
    assert [r["target_group"] for r in result.history] == ["conv2", "fc1"]
    assert result.keep["conv1"].size == result.keep["conv13"].size == 3
    assert result.summary["method"]["finetune"]["reinitialised"] == ["fc1", "fc2", "head"]
    assert (tmp_path / "run" / "result.json").is_file()
    assert 0.0 <= outcome["test"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_the_vgg_small_experiment_builds_its_runs_and_reports_them(tmp_path):
    small = experiment("progressive_vgg_small")
    for variant in small.VARIANTS:
        small.progressive_config("oracle_loss", variant, 0.05, 2048).check()
    control = small.progressive_config("l1", "bn_only", 0.05, 2048)
    assert (control.retraining, control.batch_norm) == ("none", "recalibrate")
    widths = {f"conv{i}": 4 for i in range(1, 7)} | {"fc1": 8}
    module = build_model("vgg_small", 10, widths)
    x = jnp.zeros((1, 28, 28, 1))
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    batches = [
        {"image": jax.random.normal(jax.random.key(i), (8, 28, 28, 1)), "label": jnp.arange(8)}
        for i in range(2)
    ]
    config = dataclasses.replace(
        small.progressive_config("oracle_loss", "none", 0.25, 16),
        score_batch_size=8,
        eval_examples=16,
        sample_images=4,
        layers=("conv1", "conv2"),
    )
    model = Model.linen(module, x, variables=variables)
    result = progressive_prune(model, variables, batches, config, progress=False)

    def entry(accuracy):
        test = {"accuracy": accuracy, "kappa": accuracy - 0.1}
        return {"summary": result.summary, "history": list(result.history), "test": test}

    stored = {
        "settings": {"ratio": 0.25, "score_examples": 16},
        "base": {"test": {"accuracy": 0.62, "kappa": 0.5}},
        # "none" runs once; progressive at two seeds.
        "runs": {
            "oracle_loss/none/0": entry(0.5),
            "oracle_loss/progressive/0": entry(0.6),
            "oracle_loss/progressive/1": entry(0.7),
        },
    }
    table = small.write_table(stored)
    assert "| oracle_loss | none | 50.00 ± 0.00 | 0.4000 | 1 |" in table
    assert "| oracle_loss | progressive | 65.00 ± 7.07 | 0.5500 | 2 |" in table
    assert "| conv2 | 4 | 1 |" in table
    # Each claim is decided seed by seed, against the seed-free control's single run.
    assert (
        "| (control) Progressive retraining beats no retraining (oracle_loss) | "
        "oracle_loss/progressive minus oracle_loss/none: 15.00 ± 7.07 points (+10.00, +20.00) | "
        "holds (2/2 seeds) |"
    ) in table
    assert "within 0.5 points of the base (oracle_loss, progressive) | change from 62.00: " \
        "3.00 ± 7.07 points | mixed (1/2 seeds) |" in table  # fmt: skip
    small.plot(stored, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").is_file() and (tmp_path / "accuracy.pdf").is_file()


def test_the_paper_job_for_the_command_line_carries_the_paper_config():
    paper = experiment("progressive_vgg16_cifar10")
    job = paper.get_config()
    assert job.method == "progressive" and job.model == "vgg16"
    assert job.data.name == "cifar10" and job.progressive == paper.paper_config()
