"""The flat public namespace: what `import jaxprune as jp` offers is pinned here, so that a
rename or a removal is a visible, deliberate change."""

from __future__ import annotations

import dataclasses
import inspect
import types

import jaxprune as jp

PUBLIC = {
    # graph, gates, surgery
    "ChannelGraph",
    "ChannelGroup",
    "GraphError",
    "PruneError",
    "Pruned",
    "PrunedProgram",
    "activations_and_gradients",
    "channel_graph",
    "compose_keep",
    "gated_apply_fn",
    "gated_call",
    "keep_to_masks",
    "map_over_masks",
    "masks_to_keep",
    "nnx",
    "prune",
    "rebuild_linen",
    "round_keep_to_blocks",
    "widths_from_params",
    # cost and criteria
    "CostReport",
    "count_cost",
    "CRITERIA",
    "criteria",
    "score",
    # models, training, runs
    "Model",
    "OptimizerConfig",
    "TrainState",
    "create_train_state",
    "train_step",
    "eval_step",
    "evaluate",
    "FitConfig",
    "fit",
    "DivergenceError",
    "RunDir",
    "RunLockedError",
    "RunMismatchError",
    "MetricsWriter",
    # the method contract
    "METHODS",
    "MethodSpec",
    "PruneData",
    "PruneResult",
    "BatchList",
    "Splits",
    "as_prune_data",
    "Selection",
    "keep_from_scores",
    "oneshot_prune",
    "OneShotConfig",
    "iterative_prune",
    "IterativeConfig",
    "progressive_prune",
    "ProgressiveConfig",
    "blending_prune",
    "BlendingConfig",
    "functional_prune",
    "FunctionalConfig",
}
METHODS = ("oneshot", "iterative", "progressive", "blending", "functional")


def test_all_is_the_pinned_namespace_and_every_name_resolves():
    assert set(jp.__all__) == PUBLIC
    assert len(jp.__all__) == len(PUBLIC)  # no duplicates
    for name in jp.__all__:
        assert getattr(jp, name) is not None, name


def test_no_implementation_module_leaks_into_the_namespace():
    modules = {
        name
        for name, value in vars(jp).items()
        if isinstance(value, types.ModuleType) and not name.startswith("_")
    }
    # Subpackages of the public API are names in __all__; the rest are Python's import side
    # effects (jp.graph after `import jaxprune.graph`), which star-imports do not see.
    assert modules & PUBLIC == {"criteria", "nnx"}


def test_every_method_has_the_one_contract():
    assert tuple(jp.METHODS) == METHODS
    for method in METHODS:
        assert jp.METHODS[method].prune is getattr(jp, f"{method}_prune")
        prune_fn = getattr(jp, f"{method}_prune")
        parameters = inspect.signature(prune_fn).parameters
        assert list(parameters)[:4] == ["model", "variables", "data", "config"], method
        assert parameters["workdir"].kind is inspect.Parameter.KEYWORD_ONLY, method
        assert parameters["progress"].kind is inspect.Parameter.KEYWORD_ONLY, method
        config_type = getattr(jp, f"{method.title().replace('shot', 'Shot')}Config")
        assert dataclasses.is_dataclass(config_type), method
        # Every method runs with its default config.
        assert isinstance(parameters["config"].default, config_type), method
        assert inspect.signature(prune_fn).return_annotation in ("PruneResult", jp.PruneResult)


def test_public_functions_are_typed_and_documented():
    for name in jp.__all__:
        value = getattr(jp, name)
        if inspect.isfunction(value):
            assert value.__doc__, name
            hints = inspect.signature(value)
            assert hints.return_annotation is not inspect.Signature.empty, name
