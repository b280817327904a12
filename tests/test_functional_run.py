"""The functional method's runs: fine-tuning and its report, a user's model with hard-coded widths,
an NNX model, stop and resume (in-process and, in the slow tier, a real kill).

Run as a script (``python tests/test_functional_run.py WORKDIR``) it prunes the shipped LeNet-5
on a tiny Fashion-MNIST subset with WORKDIR as the method's workdir (the method writes
WORKDIR/result.json) and writes WORKDIR/final.npz; the kill test runs it twice, once killed
(SIGKILL) after the first layer's images were checkpointed. Every layer's images wait
`LAYER_DELAY_S` before they start, killed or not, so that the kill lands between checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kill_resume import REPO_ROOT, kill_and_resume, save_variables
from user_models import CompactHardCoded, NnxCNN, init_linen

import jaxprune as jp
from jaxprune import checkpoint, data
from jaxprune.criteria.functionality import VisualizationConfig
from jaxprune.fit import FitConfig
from jaxprune.methods import functional
from jaxprune.methods.functional import FunctionalConfig, functional_prune
from jaxprune.model import Model
from jaxprune.run import RunMismatchError
from jaxprune.runtime import enable_compilation_cache
from jaxprune.train import OptimizerConfig, evaluate

LENET = REPO_ROOT / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"
LAYER_DELAY_S = 1.0
FAST = VisualizationConfig(steps=8, step_size=0.1)


def small_config(**changes) -> FunctionalConfig:
    config = FunctionalConfig(ratio=0.5, visualization=FAST, score_examples=64, batch_size=64)
    return dataclasses.replace(config, **changes)


def tiny_dataset(train_examples: int = 320) -> data.Dataset:
    return data.load(
        data.DataConfig(train_examples=train_examples, validation_examples=128, test_examples=128)
    )


def lenet_model(dataset: data.Dataset) -> tuple[Model, dict]:
    module, variables, _ = checkpoint.load_model_file(LENET)
    x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    return Model.linen(module, x, variables=variables), variables


def main(workdir: str) -> None:
    enable_compilation_cache()
    images = functional.maximization_images

    def delayed(*args, **kwargs):
        time.sleep(LAYER_DELAY_S)
        return images(*args, **kwargs)

    functional.maximization_images = delayed  # this process only
    dataset = tiny_dataset()
    model, variables = lenet_model(dataset)
    result = functional_prune(model, variables, dataset, small_config(), workdir=workdir,
                              progress=False)  # fmt: skip
    save_variables(Path(workdir, "final.npz"), result.variables)


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


@pytest.mark.slow
def test_a_fine_tuned_run_reports_before_and_after_and_reruns_identically(dataset, tmp_path):
    model, variables = lenet_model(dataset)
    optimizer = OptimizerConfig(learning_rate=0.005, momentum=0.9, schedule="cosine")
    config = small_config(finetune=FitConfig(epochs=1, optimizer=optimizer))
    result = functional_prune(model, variables, dataset, config, workdir=tmp_path, progress=False)
    assert {g: len(k) for g, k in result.keep.items()} == {"conv1": 3, "conv2": 8}
    summary = result.summary
    assert summary["cost"]["after"]["flops"] < summary["cost"]["before"]["flops"]
    assert summary["method"]["layers"]["conv2"]["clusters"] == 8
    assert set(summary["validation"]) == {"before", "pruned", "after"}
    assert len(summary["finetune"]) == 1
    # The result's variables are the fine-tuned ones, and its summary measures them.
    validation = list(data.preprocessed_batches(dataset, "validation", 64))
    again = evaluate(result.model, result.variables, validation)
    assert again["accuracy"] == pytest.approx(summary["validation"]["after"]["accuracy"])
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(summary))
    # A rerun finds everything done and reports the same.
    rerun = functional_prune(model, variables, dataset, config, workdir=tmp_path, progress=False)
    assert {g: k.tolist() for g, k in rerun.keep.items()} == {
        g: k.tolist() for g, k in result.keep.items()
    }
    assert rerun.summary == summary
    jax.tree_util.tree_map(np.testing.assert_array_equal, rerun.variables, result.variables)
    with pytest.raises(RunMismatchError, match="config.ratio: 0.5 -> 0.25"):
        functional_prune(model, variables, dataset, dataclasses.replace(config, ratio=0.25),
                         workdir=tmp_path)  # fmt: skip


def _batches(shape, classes: int, count: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.standard_normal(shape).astype(np.float32),
            "label": rng.integers(0, classes, shape[0]).astype(np.int32),
        }
        for _ in range(count)
    ]


def _check_pruned(result, model, variables, x) -> None:
    graph = jp.channel_graph(model.apply_fn, variables, x, **model.eval_kwargs)
    masks = jp.keep_to_masks(graph, result.keep)
    masked = jp.gated_call(model.apply_fn, graph, variables, x, masks, **model.eval_kwargs)
    np.testing.assert_allclose(result.model(result.variables, x), masked, rtol=1e-4, atol=1e-4)
    for name, kept in result.keep.items():
        assert kept.size == graph[name].size - round(0.5 * graph[name].size)


@pytest.mark.slow
def test_a_user_model_with_hard_coded_widths(tmp_path):
    module, variables, x, _ = init_linen(CompactHardCoded)
    model = Model.linen(module, x, variables=variables)
    batches = _batches(x.shape, 10)
    result = functional_prune(model, variables, batches, small_config(), progress=False)
    assert set(result.keep) == {"Conv_0", "Conv_1"}
    _check_pruned(result, model, variables, x)


@pytest.mark.slow
def test_an_nnx_model_resumes_in_process_after_a_failure(tmp_path, monkeypatch):
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(1).standard_normal(NnxCNN.SHAPE), jnp.float32)
    model, variables = Model.nnx(NnxCNN(rngs=nnx.Rngs(0)), x)
    batches = _batches(x.shape, 10)
    config = small_config(representative="centroid")
    whole = functional_prune(model, variables, batches, config, progress=False)
    _check_pruned(whole, model, variables, x)
    # Stopped after the first layer's images (an exception, as a Ctrl-C would be)...
    made = []
    original = functional.maximization_images

    def failing(*args, **kwargs):
        made.append(args[3])
        if len(made) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "maximization_images", failing)
    with pytest.raises(KeyboardInterrupt):
        functional_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    # ... the rerun makes the remaining layers only and ends as the uninterrupted run.
    made.clear()
    resumed = functional_prune(model, variables, batches, config, workdir=tmp_path,
                               progress=False)  # fmt: skip
    assert len(made) == len(whole.keep) - 1
    assert resumed.history == whole.history
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.variables, whole.variables)


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    command = [sys.executable, str(Path(__file__).resolve())]
    _, killed_at, _ = kill_and_resume(
        command, tmp_path, "checkpoints/images", what="layer checkpoint"
    )
    assert killed_at == [1], "killed after the first layer's images"


if __name__ == "__main__":
    main(sys.argv[1])
