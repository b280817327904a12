"""Blending under the method contract: a user's model with hard-coded widths, an NNX model, a run
stopped mid-search and resumed in-process, and a damaged score cache that is recomputed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from user_models import CompactHardCoded, NnxCNN, init_linen

import jaxprune as jp
from jaxprune.methods import blending
from jaxprune.methods.blending import POOL_SCORES_FILE, BlendingConfig, blending_prune
from jaxprune.methods.evolution import EvolutionConfig
from jaxprune.model import Model

CONFIG = BlendingConfig(
    criterion="l1,l2,fpgm,apoz",
    ratio=0.5,
    evolution=EvolutionConfig(population=4, generations=3, elitism=1, tournament_size=2),
    batch_size=8,
    finetune=None,
)


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
    """The pruned program equals the masked model, at the ratio in every pruned group."""
    graph = jp.channel_graph(model.apply_fn, variables, x, **model.eval_kwargs)
    masks = jp.keep_to_masks(graph, result.keep)
    masked = jp.gated_call(model.apply_fn, graph, variables, x, masks, **model.eval_kwargs)
    np.testing.assert_allclose(result.model(result.variables, x), masked, rtol=1e-4, atol=1e-4)
    for name, kept in result.keep.items():
        assert kept.size == graph[name].size - round(0.5 * graph[name].size)
    cost = result.summary["cost"]
    assert cost["after"]["macs"] < cost["before"]["macs"]


@pytest.fixture(scope="module")
def hard_coded():
    module, variables, x, _ = init_linen(CompactHardCoded)
    batches = _batches((8, *x.shape[1:]), 10)
    return Model.linen(module, x, variables=variables), variables, x, batches


@pytest.mark.slow
def test_a_user_model_with_hard_coded_widths(hard_coded):
    model, variables, x, batches = hard_coded
    result = blending_prune(model, variables, batches, CONFIG, progress=False)
    assert set(result.keep) == {"Conv_0", "Conv_1"}
    assert len(result.history) == 3
    _check_pruned(result, model, variables, x)
    # Its best fitness is the pruned program's accuracy on the fitness images.
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    accuracy = float(jnp.mean(jnp.argmax(result.model(result.variables, images), -1) == labels))
    assert result.summary["method"]["best"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.slow
def test_an_nnx_model():
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(1).standard_normal(NnxCNN.SHAPE), jnp.float32)
    model, variables = Model.nnx(NnxCNN(rngs=nnx.Rngs(0)), x)
    batches = _batches((8, *x.shape[1:]), 10)
    result = blending_prune(model, variables, batches, CONFIG, progress=False)
    _check_pruned(result, model, variables, x)


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_result(hard_coded, tmp_path, monkeypatch):
    model, variables, _, batches = hard_coded
    whole = blending_prune(model, variables, batches, CONFIG, progress=False)
    calls = []
    original = blending.population_fitness

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C in the third generation
        return original(*args, **kwargs)

    monkeypatch.setattr(blending, "population_fitness", stopping)
    with pytest.raises(KeyboardInterrupt):
        blending_prune(model, variables, batches, CONFIG, workdir=tmp_path, progress=False)
    calls.clear()
    resumed = blending_prune(model, variables, batches, CONFIG, workdir=tmp_path, progress=False)
    assert len(calls) == 1  # the third generation only
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
    assert resumed.summary["method"] == whole.summary["method"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.variables, whole.variables)


@pytest.mark.slow
def test_a_damaged_score_cache_is_recomputed(hard_coded, tmp_path, monkeypatch):
    model, variables, _, batches = hard_coded
    config = dataclasses.replace(CONFIG, evolution=EvolutionConfig(population=4, generations=1))
    first = blending_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    (tmp_path / POOL_SCORES_FILE).write_bytes(b"\x00\x01 not json")
    scored = []
    original = blending.score_pool
    monkeypatch.setattr(
        blending, "score_pool", lambda *a, **k: scored.append(1) or original(*a, **k)
    )
    again = blending_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    assert scored == [1]
    # The same scores again: the stored search is this run's and is read back.
    assert again.summary["method"] == first.summary["method"]
    assert (tmp_path / POOL_SCORES_FILE).read_text().startswith("{")
