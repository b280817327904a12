"""Blending pruning criteria (He et al. 2021): blended scores, population fitness, the search,
the method on the shipped LeNet-5, resume after a kill, devices, and the paper-scale config."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kill_resume import cpu_env, kill_when, run_through
from scipy import stats

from jaxprune import checkpoint, criteria, data
from jaxprune.criteria.base import softmax_cross_entropy
from jaxprune.fit import FitConfig
from jaxprune.gates import gated_call
from jaxprune.graph import channel_graph
from jaxprune.methods.blending import (
    PAPER_POOL,
    POOL_SCORES_FILE,
    BlendingConfig,
    GenomeLayout,
    blend,
    blending_prune,
    cached_pool_scores,
    candidate_scores,
    check_config,
    pool_names,
    population_masks,
    score_pool,
    search_factors,
    select_groups_config,
)
from jaxprune.methods.blending_clusters import ClusterConfig, LayerClusters
from jaxprune.methods.blending_fitness import make_chunk_fn, population_fitness
from jaxprune.methods.evolution import EvolutionConfig
from jaxprune.methods.selection import keep_from_scores
from jaxprune.model import Model
from jaxprune.models import build_model
from jaxprune.run import RunDir, RunMismatchError
from jaxprune.surgery import prune
from jaxprune.train import evaluate

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
LENET = REPO_ROOT / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"
SMALL = BlendingConfig(
    evolution=EvolutionConfig(population=6, generations=3),
    batch_size=64,
    chunk_size=4,
    finetune=None,
)


@pytest.fixture(scope="module")
def lenet():
    model, variables, _ = checkpoint.load_model_file(LENET)
    return model, variables


def as_model(module, variables, batches) -> Model:
    return Model.linen(module, batches[0]["image"][:1], variables=variables)


@pytest.fixture(scope="module")
def tiny_data():
    return data.load(
        data.DataConfig(train_examples=320, validation_examples=128, test_examples=128)
    )


@pytest.fixture(scope="module")
def setup(lenet, tiny_data):
    model, variables = lenet
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *tiny_data.image_shape)))
    batches = list(data.preprocessed_batches(tiny_data, "validation", 64, 128))
    return model, variables, graph, batches


def test_blend_is_the_factor_weighted_sum_of_rank_normalised_candidates():
    rng = np.random.default_rng(0)
    raw = {name: rng.normal(size=(3, 9)) for name in ("g", "h")}
    raw["g"][1, :4] = 0.5  # ties share their mean rank
    candidates = {
        g: np.stack([(stats.rankdata(row) - 1) / (row.size - 1) for row in s])
        for g, s in raw.items()
    }
    layout = GenomeLayout(groups=("g", "h"), candidates=(("a", "b", "c"), ("a", "b", "c")))
    genomes = rng.random((4, 6))
    blended = blend(candidates, layout, genomes)
    for p in range(4):
        for k, g in enumerate(("g", "h")):
            expected = sum(genomes[p, 3 * k + j] * candidates[g][j] for j in range(3))
            np.testing.assert_allclose(blended[g][p], expected, rtol=1e-12)
    np.testing.assert_array_equal(blend(candidates, layout, genomes[2])["h"], blended["h"][2])
    assert layout.factors(genomes[0])["h"]["b"] == genomes[0, 4]


def _layer(group: str, representatives: tuple[str, ...]) -> LayerClusters:
    n = len(representatives)
    return LayerClusters(group, representatives, np.eye(n), tuple((r,) for r in representatives),
                         representatives)  # fmt: skip


def test_candidates_are_normalised_per_layer_and_a_one_hot_blend_prunes_like_its_criterion(setup):
    _, _, graph, _ = setup
    rng = np.random.default_rng(4)
    names = ("a", "b", "c")
    # Very different scales and signs: normalisation must not care.
    pool = {
        n: {g: scale * rng.normal(size=graph[g].size) for g in ("conv1", "conv2")}
        for n, scale in zip(names, (1e-3, 1.0, -50.0), strict=True)
    }
    pool["a"]["conv2"][:3] = pool["a"]["conv2"][0]  # ties share their mean rank
    clusters = {g: _layer(g, names) for g in ("conv1", "conv2")}
    ranked = candidate_scores(pool, clusters, "rank")
    scaled = candidate_scores(pool, clusters, "l2")
    for g in clusters:
        for k, n in enumerate(names):
            expected = (stats.rankdata(pool[n][g]) - 1) / (graph[g].size - 1)
            np.testing.assert_allclose(ranked[g][k], expected, rtol=1e-12)
            np.testing.assert_allclose(scaled[g][k], pool[n][g] / np.linalg.norm(pool[n][g]))
    layout = GenomeLayout(groups=("conv1", "conv2"), candidates=(names, names))
    selection = select_groups_config(BlendingConfig(ratio=0.5))
    for k, n in enumerate(names):
        one_hot = np.zeros(layout.size)
        one_hot[[k, 3 + k]] = 0.7
        masks = population_masks(graph, blend(ranked, layout, one_hot[None]), selection)
        # Higher score = more relevant: the blend keeps what the criterion alone keeps.
        keep = keep_from_scores(graph, {g: pool[n][g] for g in clusters}, selection)
        for g in clusters:
            np.testing.assert_array_equal(np.flatnonzero(masks[g][0]), keep[g])


def test_global_ranking_removes_the_ratio_of_all_channels(setup):
    _, _, graph, _ = setup
    rng = np.random.default_rng(5)
    blended = {g: rng.random((4, graph[g].size)) for g in ("conv1", "conv2")}
    selection = select_groups_config(BlendingConfig(ratio=0.5, ranking="global"))
    masks = population_masks(graph, blended, selection)
    total = graph["conv1"].size + graph["conv2"].size
    for p in range(4):
        kept = int(masks["conv1"][p].sum() + masks["conv2"][p].sum())
        assert kept == total - round(0.5 * total)
        threshold = min(blended[g][p][masks[g][p] == 1].min() for g in masks)
        assert all((blended[g][p][masks[g][p] == 0] <= threshold).all() for g in masks)


class _Killed(Exception):
    pass


def _synthetic_search(graph):
    """A search whose fitness is a known function of the masks: no model runs."""
    rng = np.random.default_rng(6)
    names = ("a", "b", "c")
    candidates = {g: rng.random((3, graph[g].size)) for g in ("conv1", "conv2")}
    layout = GenomeLayout(groups=("conv1", "conv2"), candidates=(names, names))
    wanted = {g: candidates[g][1] > np.median(candidates[g][1]) for g in candidates}
    calls = []

    def evaluate(masks, kill_at=None):
        calls.append(1)
        if kill_at is not None and len(calls) == kill_at:
            raise _Killed
        hits = sum((masks[g] == wanted[g]).mean(axis=1) for g in masks) / len(masks)
        loss = 1.0 - hits + 0.01 * masks["conv1"][:, 0]
        return np.round(hits, 2), loss, len(hits)

    return evaluate, candidates, layout, calls


@pytest.mark.parametrize("fitness", ["accuracy", "loss"])
def test_a_search_killed_mid_way_resumes_from_its_last_generation(setup, tmp_path, fitness):
    _, _, graph, _ = setup
    config = dataclasses.replace(
        SMALL, fitness=fitness, evolution=EvolutionConfig(population=8, generations=5)
    )
    evaluate, candidates, layout, calls = _synthetic_search(graph)
    whole = search_factors(evaluate, graph, candidates, layout, config, fingerprint="f")
    assert len(calls) == 5
    calls.clear()
    with pytest.raises(_Killed), RunDir.open(tmp_path, kind="search", identity={}) as run:
        search_factors(lambda m: evaluate(m, kill_at=3), graph, candidates, layout, config,
                       fingerprint="f", run=run)  # fmt: skip
    calls.clear()
    with RunDir.open(tmp_path, kind="search", identity={}) as run:
        resumed = search_factors(
            evaluate, graph, candidates, layout, config, fingerprint="f", run=run
        )
    assert len(calls) == 3  # generations 2, 3 and 4 only
    np.testing.assert_array_equal(resumed[0], whole[0])
    assert resumed[1] == whole[1]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole[2]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed[2]] == strip
    # The best is the best of every generation, and best-so-far never gets worse.
    key = "best_accuracy" if fitness == "accuracy" else "best_loss"
    sign = 1 if fitness == "accuracy" else -1
    assert resumed[1][fitness] == max(sign * r[key] for r in strip) * sign
    so_far = [sign * r["best_so_far"] for r in strip]
    assert so_far == sorted(so_far)
    with pytest.raises(ValueError, match="other settings"):
        with RunDir.open(tmp_path, kind="search", identity={}) as run:
            search_factors(evaluate, graph, candidates, layout, config, fingerprint="g", run=run)


def test_a_damaged_generation_falls_back_to_the_one_before(setup, tmp_path):
    _, _, graph, _ = setup
    config = dataclasses.replace(SMALL, evolution=EvolutionConfig(population=8, generations=4))
    evaluate, candidates, layout, calls = _synthetic_search(graph)
    whole = search_factors(evaluate, graph, candidates, layout, config, fingerprint="f")
    calls.clear()
    with pytest.raises(_Killed), RunDir.open(tmp_path, kind="search", identity={}) as run:
        search_factors(lambda m: evaluate(m, kill_at=4), graph, candidates, layout, config,
                       fingerprint="f", run=run)  # fmt: skip
    # Generations 1 and 2 are kept; the newest is cut short (a full disk).
    assert sorted(p.name for p in (tmp_path / "search").iterdir()) == [
        "generation_000002.json",
        "generation_000003.json",
    ]
    (tmp_path / "search" / "generation_000003.json").write_text('{"format": "jaxprune-blen')
    calls.clear()
    with RunDir.open(tmp_path, kind="search", identity={}) as run:
        resumed = search_factors(
            evaluate, graph, candidates, layout, config, fingerprint="f", run=run
        )
    assert len(calls) == 2  # generations 2 and 3 again
    np.testing.assert_array_equal(resumed[0], whole[0])
    assert resumed[1] == whole[1]


@pytest.mark.slow
def test_vmapped_population_fitness_equals_separately_pruned_networks(setup):
    model, variables, graph, batches = setup
    rng = np.random.default_rng(1)
    scores = {g: rng.random((7, graph[g].size)) for g in ("conv1", "conv2")}
    scores["conv1"][3] = scores["conv1"][0]  # a duplicate candidate
    scores["conv2"][3] = scores["conv2"][0]
    selection = select_groups_config(BlendingConfig(ratio=0.5))
    masks = population_masks(graph, scores, selection)
    chunk_fn = make_chunk_fn(model.apply, graph)
    found = population_fitness(chunk_fn, variables, masks, batches, chunk_size=3)
    assert found.evaluated == 6
    whole = population_fitness(chunk_fn, variables, masks, batches, deduplicate=False)
    np.testing.assert_array_equal(found.accuracy, whole.accuracy)
    np.testing.assert_allclose(found.loss, whole.loss, rtol=1e-6)
    images = jnp.concatenate([b["image"] for b in batches])
    labels = jnp.concatenate([b["label"] for b in batches])
    for p in range(7):
        keep = {g: np.flatnonzero(masks[g][p]) for g in masks}
        pruned = prune(variables, graph, keep)
        logits = pruned.apply_fn(pruned.variables, images, train=False)
        accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels))
        loss = float(jnp.mean(softmax_cross_entropy(logits, labels)))
        assert found.accuracy[p] == pytest.approx(accuracy, abs=1e-9)
        assert found.loss[p] == pytest.approx(loss, rel=1e-4)
        gated = gated_call(model.apply, graph, variables, images, {g: masks[g][p] for g in masks},
                           train=False)  # fmt: skip
        assert found.accuracy[p] == pytest.approx(
            float(jnp.mean(jnp.argmax(gated, -1) == labels)), abs=1e-9
        )


@pytest.mark.slow
def test_search_prunes_to_the_ratio_and_its_best_is_the_pruned_accuracy(setup):
    module, variables, graph, batches = setup
    model = as_model(module, variables, batches)
    result = blending_prune(model, variables, batches, SMALL, progress=False)
    widths = {g: k.size for g, k in result.keep.items()}
    assert widths == {"conv1": 3, "conv2": 8}
    report = result.summary["method"]
    factors, clusters, best = report["factors"], report["clusters"], report["best"]
    assert set(factors) == {"conv1", "conv2"}
    for group, layer in clusters.items():
        assert set(factors[group]) == set(layer["representatives"])
        assert all(0.0 <= f <= 1.0 for f in factors[group].values())
        # LeNet has no BatchNorm: the BN criteria of the pool do not score it.
        assert tuple(layer["criteria"]) == tuple(
            c for c in PAPER_POOL if not c.startswith(("bn", "taylor_bn"))
        )
    assert len(result.history) == 3
    best_so_far = [r["best_so_far"] for r in result.history]
    assert best_so_far == sorted(best_so_far) and best_so_far[-1] == best["accuracy"]
    images = jnp.concatenate([b["image"] for b in batches])
    labels = jnp.concatenate([b["label"] for b in batches])
    logits = result.model(result.variables, images)  # the pruned program
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels))
    assert best["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    # Without fine-tuning the final model is the pruned one.
    validation = result.summary["validation"]
    assert validation["after"] == validation["pruned"]
    assert validation["after"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    again = blending_prune(model, variables, batches, SMALL, progress=False)
    assert again.summary["method"] == report


@pytest.mark.slow
def test_a_finished_workdir_is_reused_and_another_config_is_refused(setup, tmp_path):
    module, variables, graph, batches = setup
    model = as_model(module, variables, batches)
    first = blending_prune(model, variables, batches, SMALL, workdir=tmp_path, progress=False)
    assert (tmp_path / POOL_SCORES_FILE).is_file()
    began = time.perf_counter()
    second = blending_prune(model, variables, batches, SMALL, workdir=tmp_path, progress=False)
    assert time.perf_counter() - began < 10  # nothing left to score or evaluate
    assert second.summary["method"] == first.summary["method"]
    with pytest.raises(RunMismatchError, match="config.seed: 0 -> 1"):
        blending_prune(model, variables, batches, dataclasses.replace(SMALL, seed=1),
                       workdir=tmp_path)  # fmt: skip
    # Other fitness images, or another model, are another run.
    with pytest.raises(RunMismatchError, match="fitness_data"):
        blending_prune(model, variables, batches[:1], SMALL, workdir=tmp_path)
    other = jax.tree_util.tree_map(lambda v: v * 1.01, variables)
    with pytest.raises(RunMismatchError, match="variables"):
        blending_prune(model, other, batches, SMALL, workdir=tmp_path)
    # How many candidates share a compiled call changes nothing: the run resumes.
    third = blending_prune(model, variables, batches, dataclasses.replace(SMALL, chunk_size=2),
                           workdir=tmp_path, progress=False)  # fmt: skip
    assert third.summary["method"] == first.summary["method"]


def test_stored_pool_scores_are_used_only_for_the_same_model_and_images(setup, tmp_path):
    module, variables, graph, batches = setup
    context = criteria.ScoringContext(module.apply, graph)
    pool = ("l1", "apoz")
    identity = {"model": "a", "images": 2}
    with RunDir.open(tmp_path, kind="scores", identity={}) as run:
        first = cached_pool_scores(context, variables, batches, pool, run, identity)
        stored = tmp_path / POOL_SCORES_FILE
        assert stored.is_file()
        again = cached_pool_scores(context, variables, [], pool, run, identity)
        np.testing.assert_array_equal(again["apoz"]["conv2"], first["apoz"]["conv2"])
        fewer = cached_pool_scores(context, variables, batches[:1], pool, run, {"images": 1})
        expected = score_pool(context, variables, batches[:1], pool)
        np.testing.assert_array_equal(fewer["apoz"]["conv2"], expected["apoz"]["conv2"])
        assert not np.array_equal(fewer["apoz"]["conv2"], first["apoz"]["conv2"])
        # A damaged file is scored again, not fatal.
        stored.write_text('{"identity": {"images": 1}, "value": {"l1": [0.1, ')
        repaired = cached_pool_scores(context, variables, batches, pool, run, identity)
        np.testing.assert_array_equal(repaired["apoz"]["conv2"], first["apoz"]["conv2"])
        assert run.artifact(POOL_SCORES_FILE, identity) is not None


def finished_generations(workdir: Path) -> list[int]:
    directory = workdir / "search"
    if not directory.is_dir():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in directory.glob("generation_*.json"))


RUN = [sys.executable, str(TESTS_DIR / "blending_run.py")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The result of tests/blending_run.py run through on one device."""
    workdir = tmp_path_factory.mktemp("whole")
    run_through([*RUN, str(workdir), "0"])
    return json.loads((workdir / "outcome.json").read_text())


@pytest.mark.slow
def test_a_killed_search_resumes_and_ends_like_an_uninterrupted_one(tmp_path, uninterrupted):
    resumed = tmp_path / "resumed"
    returncode = kill_when(
        [*RUN, str(resumed), "0.15"],
        lambda: finished_generations(resumed),
        what="generation checkpoint",
    )
    assert returncode == -signal.SIGKILL
    assert not (resumed / "result.json").exists(), "the search finished before it was killed"
    finished = max(finished_generations(resumed))
    assert finished < 6
    newest = resumed / "search" / f"generation_{finished:06d}.json"
    seconds_at_kill = [r["seconds"] for r in json.loads(newest.read_text())["history"]]

    run_through([*RUN, str(resumed), "0"])
    expected = uninterrupted
    got = json.loads((resumed / "outcome.json").read_text())
    assert got == expected
    assert len(expected["history"]) == 6
    # The generations finished before the kill were read back, not run again.
    seconds = json.loads((resumed / "seconds.json").read_text())
    assert seconds[:finished] == seconds_at_kill


@pytest.mark.slow
def test_the_population_is_sharded_over_devices_with_the_same_result(tmp_path, uninterrupted):
    env = cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run_through([*RUN, str(tmp_path), "0"], env)
    a = uninterrupted
    b = json.loads((tmp_path / "outcome.json").read_text())
    assert (a["devices"], b["devices"]) == (1, 2)
    assert [r["best_accuracy"] for r in a["history"]] == [r["best_accuracy"] for r in b["history"]]
    np.testing.assert_allclose(
        [r["mean_loss"] for r in a["history"]], [r["mean_loss"] for r in b["history"]], rtol=1e-5
    )
    assert a["keep"] == b["keep"]


@pytest.mark.slow
def test_the_method_fine_tunes_the_pruned_program_and_reports_before_and_after(
    lenet, tiny_data, tmp_path
):
    module, variables = lenet
    x = jnp.zeros((1, *tiny_data.image_shape))
    model = Model.linen(module, x, variables=variables)
    config = dataclasses.replace(SMALL, finetune=FitConfig(epochs=1, checkpoint_every=2))
    result = blending_prune(model, variables, tiny_data, config, workdir=tmp_path, progress=False)
    assert {g: k.size for g, k in result.keep.items()} == {"conv1": 3, "conv2": 8}
    summary = result.summary
    assert summary["cost"]["after"]["flops"] < summary["cost"]["before"]["flops"]
    kept = sum(k.size for k in result.keep.values())
    total = sum(result.graph[g].size for g in result.keep)
    assert kept / total == pytest.approx(11 / 22)
    for stage in ("before", "pruned", "after"):
        assert 0.0 < summary["validation"][stage]["accuracy"] <= 1.0
    # The result's variables are the fine-tuned ones; "pruned" is the model before that.
    validation = list(data.preprocessed_batches(tiny_data, "validation", 64))
    assert evaluate(result.model, result.variables, validation) == summary["validation"]["after"]
    assert summary["validation"]["pruned"] != summary["validation"]["after"]
    assert len(summary["finetune"]) == 1 and summary["finetune"][0]["step"] == 5
    assert summary["method"]["generations"] == 3 == len(result.history)
    assert set(summary["method"]["factors"]) == {"conv1", "conv2"}
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(summary))
    # Rerun: everything is read back, the fine-tuned variables included.
    again = blending_prune(model, variables, tiny_data, config, workdir=tmp_path, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.variables, result.variables)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"criterion": "l1"}, "at least two distinct criteria"),
        ({"criterion": "l1,nope"}, "Unknown criteria"),
        ({"ratio": 0.0}, "ratio must be in"),
        ({"normalization": "zscore"}, "normalization must be one of"),
        ({"fitness": "kappa"}, "fitness must be one of"),
        ({"ranking": "by_flops"}, "ranking must be"),
        ({"chunk_size": -1}, "chunk_size must be"),
        ({"min_channels": 0}, "min_channels must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"finetune": FitConfig(epochs=0)}, "epochs must be > 0"),
        ({"finetune": {"epochs": 1}}, "finetune must be a jaxprune.fit.FitConfig"),
        ({"clustering": ClusterConfig(similarity="pearson")}, "similarity must be one of"),
        ({"evolution": EvolutionConfig(elitism=32)}, "elitism must be in"),
    ],
)
def test_bad_configs_are_refused_with_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        check_config(dataclasses.replace(BlendingConfig(), **changes))


def test_pool_names():
    assert pool_names(BlendingConfig()) == PAPER_POOL and len(PAPER_POOL) == 12
    assert pool_names(BlendingConfig(criterion="l1, fpgm,l1")) == ("l1", "fpgm")


@pytest.mark.slow
def test_the_resnet56_cifar100_config_runs_two_generations_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from jaxprune.cli import load_config

    job = load_config(REPO_ROOT / "experiments" / "blending_resnet56_cifar100.py")
    config = job.blending
    assert job.method == "blending" and job.model == "resnet56"
    assert config.criterion == "all" and config.evolution.population == 32
    assert config.finetune is not None and config.finetune.epochs == 40
    assert job.data.name == "cifar100"
    widths = {name: 4 for name in build_model("resnet56", 100).full_widths() if name != "head"}
    module = build_model("resnet56", 100, widths)
    x = jnp.zeros((1, 32, 32, 3))
    variables = module.init(jax.random.key(0), x)
    model = Model.linen(module, x, variables=variables)
    tiny = dataclasses.replace(
        config,
        evolution=dataclasses.replace(config.evolution, generations=2, population=4),
        finetune=None,
    )
    data_config = dataclasses.replace(job.data, data_dir=str(tmp_path / "data"), validation_size=8)
    with tfds.testing.mock_data(num_examples=24):
        dataset = data.load(data_config)
        result = blending_prune(model, variables, dataset, tiny, workdir=tmp_path / "run",
                                progress=False)  # fmt: skip
    assert len(result.history) == 2
    assert all(k.size == 2 for k in result.keep.values())
    assert (tmp_path / "run" / "result.json").is_file()
