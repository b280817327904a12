"""The one-shot method under the method contract: a user's model, no rebuild, a workdir that
resumes the same run and refuses another."""

import jax
import numpy as np
import pytest
from user_models import ShapeBranchResNet, init_linen

import jaxprune as jp
from jaxprune.fit import FitConfig
from jaxprune.methods.oneshot import OneShotConfig, oneshot_prune
from jaxprune.model import Model
from jaxprune.run import RunMismatchError


@pytest.fixture(scope="module")
def problem():
    module, variables, x, _ = init_linen(ShapeBranchResNet)
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 5, 8).astype(np.int32),
        }
        for _ in range(3)
    ]
    return Model.linen(module, x, variables=variables), variables, batches


@pytest.mark.slow
def test_oneshot_prunes_a_hard_coded_model_and_runs_the_pruned_program(problem):
    model, variables, batches = problem
    result = oneshot_prune(model, variables, batches, OneShotConfig(criterion="l1", ratio=0.5))
    assert result.method == "oneshot"
    graph = jp.channel_graph(model.apply_fn, variables, model.example_input)
    assert set(result.keep) == set(graph.names)
    for name, kept in result.keep.items():
        assert kept.size == graph[name].size - round(0.5 * graph[name].size)
    masked = jp.gated_call(
        model.apply_fn, graph, variables, batches[0]["image"], jp.keep_to_masks(graph, result.keep)
    )
    np.testing.assert_allclose(
        result.model(result.variables, batches[0]["image"]), masked, atol=1e-5
    )
    cost = result.summary["cost"]
    assert cost["after"]["macs"] < 0.5 * cost["before"]["macs"]


@pytest.mark.slow
def test_the_workdir_resumes_the_same_run_and_refuses_another(problem, tmp_path):
    model, variables, batches = problem
    config = OneShotConfig(criterion="taylor", ratio=0.25, finetune=FitConfig(epochs=1))
    first = oneshot_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    again = oneshot_prune(model, variables, batches, config, workdir=tmp_path, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.variables, again.variables)
    with pytest.raises(RunMismatchError, match=r"config.ratio: 0.25 -> 0.5"):
        oneshot_prune(
            model,
            variables,
            batches,
            OneShotConfig(criterion="taylor", ratio=0.5),
            workdir=tmp_path,
        )
    other_model = jax.tree_util.tree_map(lambda a: a * 1.01, variables)
    with pytest.raises(RunMismatchError, match="variables"):
        oneshot_prune(model, other_model, batches, config, workdir=tmp_path)


def test_bad_settings_fail_before_any_work(problem):
    model, variables, batches = problem
    with pytest.raises(ValueError, match="not a registered criterion"):
        oneshot_prune(model, variables, batches, OneShotConfig(criterion="tailor"))
    with pytest.raises(ValueError, match="ratio must be in"):
        oneshot_prune(model, variables, batches, OneShotConfig(ratio=1.5))
