"""TrainConfig.conv_impl: the training loop builds its model with the chosen convolution."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from test_train import SyntheticDataset, loop_config

from jaxprune import cli, train_job


def _final_params(config: train_job.TrainConfig, workdir) -> dict:
    train_job.train_and_evaluate(config, workdir, dataset=SyntheticDataset())
    variables, _ = train_job.latest_variables(workdir)
    return jax.device_get(variables["params"])


@pytest.mark.slow
def test_gemm_conv_reaches_the_stock_parameters(tmp_path, monkeypatch):
    built = []
    original = train_job.build_model

    def recording_build_model(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_job, "build_model", recording_build_model)
    common = dict(epochs=1, checkpoint_every_steps=100)
    stock = _final_params(loop_config(conv_impl="xla", **common), tmp_path / "xla")
    gemm = _final_params(loop_config(conv_impl="gemm", **common), tmp_path / "gemm")

    # (Reading the final variables back builds the default model too.)
    assert [model.conv_impl for model in built if model.conv_impl != "auto"] == ["xla", "gemm"]
    built = [model for model in built if model.conv_impl != "auto"]
    # The gemm model's convolutions carry the custom backward rule; the stock ones do not.
    x = np.zeros((2, 28, 28, 1), np.float32)
    variables = jax.eval_shape(built[0].init, jax.random.key(0), x)
    jaxprs = [str(jax.make_jaxpr(model.apply)(variables, x)) for model in built]
    assert "custom_vjp_call" not in jaxprs[0]
    assert jaxprs[1].count("custom_vjp_call") == 2  # conv1 and conv2
    # Four steps of SGD: the same parameters up to float rounding.
    chex.assert_trees_all_close(gemm, stock, rtol=2e-4, atol=2e-5)


def test_set_override_selects_gemm():
    config = cli.apply_overrides(train_job.TrainConfig(), ["conv_impl=gemm"])
    assert config.conv_impl == "gemm"
    assert train_job.TrainConfig().conv_impl == "auto"
    assert train_job.TrainConfig.from_dict(config.to_dict()) == config


def test_unknown_conv_impl_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"conv_impl 'fast' is unknown.*'auto'.*gemm"):
        train_job.train_and_evaluate(
            loop_config(conv_impl="fast"), tmp_path, dataset=SyntheticDataset()
        )
    assert not (tmp_path / "checkpoints").exists()
