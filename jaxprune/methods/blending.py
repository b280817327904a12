"""Blending pruning criteria with an evolutionary search (He et al., ICANN 2021, arXiv 2107.05033).

1. Score every channel with each criterion of a pool (the paper's 12 by default) on the first
   `score_examples` validation images.
2. Per layer, cluster the criteria by the rank similarity of their scores and keep one
   representative per cluster (`blending_clusters`).
3. The blended score of channel c of layer l is ``sum_k f_{l,k} * norm(s_{l,k})_c`` over the
   layer's representatives k, with ``norm`` a per-layer normalisation (ranks scaled to [0, 1]
   by default) and f the calibration factors.
4. A seeded genetic algorithm (`evolution`) searches the factors. A genome's fitness is the
   accuracy (ties broken by loss) of the network pruned with its blended scores at the target
   ratio, without fine-tuning, on the first `fitness_examples` validation images; the
   population runs as masked forward passes of the unpruned model (`jaxprune.gated_call`),
   vmapped in chunks of candidates per batch (`blending_fitness`). Each generation is
   checkpointed in the run directory (`blending_checkpoint`), so a killed search resumes and
   ends identically.
5. The best factors prune the model (`jaxprune.prune`: the pruned program, no rebuild), and
   `config.finetune` fine-tunes it (`jaxprune.fit.fit`, resumable).

The method is reconstructed from the paper's abstract (its full text was not available to us):
every algorithmic specific below is our choice, and each is a knob (`BlendingConfig`,
`ClusterConfig`, `EvolutionConfig`). `EvolutionConfig(strategy="random")` replaces the genetic
operators by uniform sampling with the same number of evaluations, the control that shows
whether the search itself helps:

* Normalisation before blending: ranks scaled to [0, 1] per layer (scale-free; the criteria's
  ranges differ by orders of magnitude). "l2" and "max" are the alternatives.
* Clustering: Spearman similarity, average linkage, merge while the similarity is >= 0.7, the
  medoid represents its cluster; criteria a layer lacks (BN ones without BatchNorm) are left
  out of that layer.
* Factors: one per layer and representative, in [0, 1]; the search starts from one genome of
  equal factors (the plain sum) and random ones. Per-layer ranking depends only on the ratios
  of a layer's factors; under global ranking their size also shifts the layer's share of the
  pruning, so the search then allocates the ratio across layers too.
* The genetic algorithm: tournament selection of 3, uniform crossover at 0.9, per-gene
  Gaussian mutation at 0.2 with sigma 0.2 decaying by 0.95 per generation, elitism of 2,
  population 32 for 20 generations.
* Fitness: accuracy, ties broken by the loss, on the first `fitness_examples` validation
  images; the criteria read the first `score_examples` validation images.
* Fine-tuning: one epoch (SGD, momentum 0.9, cosine from 0.01) by default.

With a workdir the run keeps, in one `jaxprune.run.RunDir` of kind "blending": the pool's
scores (``pool_scores.json``, reused only for the same model, score images and pool; a damaged
file is recomputed), the search's generations (``search/``), the fine-tuning's checkpoints and
``result.json``. Rerunning resumes; another run there is refused with its changed fields named.

Example::

  model = jp.Model.linen(module, x, variables=variables)
  result = blending_prune(model, variables, validation_batches, BlendingConfig(ratio=0.5),
                          workdir="workdirs/blend")
  logits = result.model(result.variables, x)  # the pruned program
  result.summary["method"]["factors"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxprune import criteria
from jaxprune.fit import FitConfig, fit
from jaxprune.graph import ChannelGraph, channel_graph
from jaxprune.methods import evolution
from jaxprune.methods.blending_checkpoint import load_search, save_search
from jaxprune.methods.blending_clusters import (
    ClusterConfig,
    LayerClusters,
    check_cluster_config,
    cluster_layer,
)
from jaxprune.methods.blending_fitness import make_chunk_fn, population_fitness
from jaxprune.methods.contract import PruneResult, as_prune_data
from jaxprune.methods.evolution import EvolutionConfig
from jaxprune.methods.live import checkpointed_steps, open_metrics, write_result
from jaxprune.methods.outcome import finetuned_summary, first_examples
from jaxprune.methods.selection import Selection, keep_from_scores, select_groups
from jaxprune.metrics import MetricsWriter
from jaxprune.model import Model
from jaxprune.run import RunDir, config_identity, fingerprint
from jaxprune.runtime import release_compiled_programs_if_crowded
from jaxprune.sharding import default_mesh
from jaxprune.surgery import prune

# The pool of He et al. 2021 (their figure of criteria similarities lists these 12).
PAPER_POOL = (
    "l1",
    "l2",
    "fpgm",
    "fermat",
    "bn_gamma",
    "bn_beta",
    "taylor_bn_gamma",
    "taylor_bn_beta",
    "taylor_weight_l1",
    "taylor_weight_l2",
    "apoz",
    "entropy",
)
NORMALIZATIONS: Mapping[str, Callable[..., dict[str, np.ndarray]]] = {
    "rank": criteria.normalize_rank,
    "l2": criteria.normalize_l2,
    "max": criteria.normalize_max,
}
FITNESSES = ("accuracy", "loss")
PoolScores = dict[str, dict[str, np.ndarray]]
# Fields that change nothing the run computes: how many candidates share a compiled call (the
# losses agree to float32 precision, measured in tests/test_blending_fitness_chunks.py), and
# how often the fine-tuning checkpoints.
_COSMETIC = ("chunk_size", "finetune.checkpoint_every")
POOL_SCORES_FILE = "pool_scores.json"


def _default_finetune() -> FitConfig:
    return FitConfig(epochs=1.0)


@dataclasses.dataclass(frozen=True)
class BlendingConfig:
    """The pool, the clustering, the search, the pruning target and the fine-tuning."""

    # The criteria pool: "all" (the paper's 12, `PAPER_POOL`) or comma-separated registry
    # names (at least two distinct).
    criterion: str = "all"
    # Fraction of each conv group's kernels removed (per_layer) or of all of them (global).
    ratio: float = 0.5
    # "per_layer": every group loses `ratio`; "global": one ranking over all groups (the
    # blended scores are on a common scale, and the size of a layer's factors shifts its
    # share, so the search also allocates the ratio across layers).
    ranking: str = "per_layer"
    # "conv": prune conv groups only; "all": dense hidden layers too.
    scope: str = "conv"
    # Never leave a group with fewer channels than this.
    min_channels: int = 1
    # Per-layer normalisation of each candidate's scores before blending: "rank" (ranks in
    # [0, 1]: scale-free, robust to the criteria's very different ranges), "l2" or "max".
    normalization: str = "rank"
    # How each layer's criteria are clustered and represented.
    clustering: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    # The genetic algorithm over the calibration factors (one per layer and representative).
    evolution: EvolutionConfig = dataclasses.field(default_factory=EvolutionConfig)
    # Fitness: "accuracy" (ties broken by lower loss) or "loss" (lower is fitter, ties by
    # accuracy) of the pruned, not fine-tuned network on the fitness images.
    fitness: str = "accuracy"
    # Validation images the criteria read (the Taylor ones need gradients: the costly part).
    score_examples: int = 1024
    # Validation images of the fitness (fixed, the first ones of the split; 1000 gives an
    # accuracy resolution of 0.1 point).
    fitness_examples: int = 1000
    # Batch size of scoring and of the fitness evaluation (the validation images are re-cut
    # into batches of this size). Kept at 250: on a CPU, the fitness at one candidate per call
    # showed no consistent order among batches of 64, 128 and 256
    # (experiments/bench/population.py); scoring was not measured.
    batch_size: int = 250
    # Candidates per vmapped fitness call (activations scale with it); 0: automatic
    # (`blending_fitness.auto_chunk_size`): 1 on a CPU, where wider chunks measured 1.2-3.6x
    # slower (experiments/bench/population.py), up to 32 on accelerators (not measured here).
    chunk_size: int = 0
    # Fine-tuning of the pruned model on the training data (`jaxprune.fit`); None: none. Default:
    # one epoch, SGD with momentum 0.9 and a cosine schedule from 0.01.
    finetune: FitConfig | None = dataclasses.field(default_factory=_default_finetune)
    # Seed of the search.
    seed: int = 0

    def check(self) -> None:
        """Refuses bad settings before any scoring starts (`check_config`)."""
        check_config(self)


@dataclasses.dataclass(frozen=True)
class GenomeLayout:
    """Which gene is which factor: per pruned group, its candidate criteria in order."""

    groups: tuple[str, ...]
    candidates: tuple[tuple[str, ...], ...]

    @property
    def size(self) -> int:
        """Genes per genome."""
        return sum(len(c) for c in self.candidates)

    def slices(self) -> dict[str, slice]:
        """The genes of each group.

        Returns:
          ``{group: slice}`` into a genome, in gene order.
        """
        out, start = {}, 0
        for group, names in zip(self.groups, self.candidates, strict=True):
            out[group] = slice(start, start + len(names))
            start += len(names)
        return out

    def factors(self, genome: Sequence[float]) -> dict[str, dict[str, float]]:
        """A genome as named factors.

        Args:
          genome: `size` genes.

        Returns:
          ``{group: {criterion: factor}}``.
        """
        genome = np.asarray(genome, np.float64)
        if genome.shape != (self.size,):
            raise ValueError(f"A genome has {self.size} genes here, got shape {genome.shape}.")
        return {
            group: dict(zip(names, genome[part].tolist(), strict=True))
            for (group, part), names in zip(self.slices().items(), self.candidates, strict=True)
        }


def pool_names(config: BlendingConfig) -> tuple[str, ...]:
    """The pool the config names: `PAPER_POOL` for "all", else the comma-separated names.

    Args:
      config: its `criterion` names the pool.

    Returns:
      The criteria in pool order, each once.

    Raises:
      ValueError: an unknown criterion, or fewer than two distinct ones.
    """
    if config.criterion.strip() == "all":
        return PAPER_POOL
    names = tuple(n.strip() for n in config.criterion.split(",") if n.strip())
    unknown = [n for n in names if n not in criteria.CRITERIA]
    if unknown:
        raise ValueError(
            f"Unknown criteria {unknown} in the pool {config.criterion!r}; use registered names "
            f"({', '.join(sorted(criteria.CRITERIA))}) or 'all'."
        )
    if len(set(names)) < 2:
        raise ValueError(
            f"Blending needs at least two distinct criteria, got {config.criterion!r}; give a "
            "comma-separated pool such as 'l1,fpgm,taylor_bn_gamma' or 'all' (the paper's 12)."
        )
    return tuple(dict.fromkeys(names))


def check_config(config: BlendingConfig) -> None:
    """Refuses a bad `BlendingConfig` before any scoring starts.

    Args:
      config: the settings, nested clustering, evolution and fine-tuning settings included.

    Raises:
      ValueError: naming the bad field and its valid values.
    """
    pool_names(config)
    if not 0.0 < config.ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), the fraction removed; got {config.ratio}.")
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {tuple(NORMALIZATIONS)}, got {config.normalization!r}."
        )
    if config.fitness not in FITNESSES:
        raise ValueError(f"fitness must be one of {FITNESSES}, got {config.fitness!r}.")
    for name in ("score_examples", "fitness_examples", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}.")
    if config.chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1, or 0 for automatic; got {config.chunk_size}.")
    if config.min_channels < 1:
        raise ValueError(
            f"min_channels must be >= 1 (a group cannot lose all its channels), got "
            f"{config.min_channels}."
        )
    if config.seed < 0:
        raise ValueError(f"seed must be >= 0, got {config.seed}.")
    check_cluster_config(config.clustering)
    evolution.check_evolution_config(config.evolution)
    select_groups_config(config)
    if config.finetune is not None:
        if not isinstance(config.finetune, FitConfig):
            raise ValueError(
                f"finetune must be a jaxprune.fit.FitConfig or None, got "
                f"{type(config.finetune).__name__}."
            )
        config.finetune.check()


def select_groups_config(config: BlendingConfig) -> Selection:
    """The selection (ratio, scope, ranking, minimum) the blended scores are cut with.

    Args:
      config: the blending settings.

    Returns:
      The `Selection` that `selection.keep_from_scores` applies to blended scores.

    Raises:
      ValueError: an unknown ranking or scope.
    """
    if config.ranking not in ("per_layer", "global"):
        raise ValueError(f"ranking must be 'per_layer' or 'global', got {config.ranking!r}.")
    if config.scope not in ("conv", "all"):
        raise ValueError(f"scope must be 'conv' or 'all', got {config.scope!r}.")
    return Selection(
        ratio=config.ratio,
        scope=config.scope,
        ranking=config.ranking,
        min_channels=config.min_channels,
    )


# ---------------------------------------------------------------------------------------------
# Pool scores, clusters, blended scores
# ---------------------------------------------------------------------------------------------


def score_pool(
    context: criteria.ScoringContext,
    variables: Any,
    batches: Iterable[Mapping[str, Any]] | None,
    pool: Sequence[str],
) -> PoolScores:
    """Every criterion of the pool's scores, ``{criterion: {group: scores}}``, on the same data.

    Args:
      context: the model and its graph.
      variables: the model variables.
      batches: validation batches for the data criteria (re-iterable).
      pool: criterion names.

    Returns:
      Scores per criterion (in pool order) and group.
    """
    batches = list(batches) if batches is not None else None
    return {name: criteria.score(name, context, variables, batches) for name in pool}


def cluster_pool(
    pool_scores: Mapping[str, Mapping[str, Any]], groups: Sequence[str], config: ClusterConfig
) -> dict[str, LayerClusters]:
    """Each group's criteria clustering (`blending_clusters.cluster_layer`).

    Args:
      pool_scores: ``{criterion: {group: scores}}`` of the pool, in pool order.
      groups: the groups to cluster.
      config: similarity, linkage, stopping rule and representative.

    Returns:
      ``{group: LayerClusters}``.
    """
    return {group: cluster_layer(group, pool_scores, config) for group in groups}


def candidate_scores(
    pool_scores: Mapping[str, Mapping[str, Any]],
    clusters: Mapping[str, LayerClusters],
    normalization: str = "rank",
) -> dict[str, np.ndarray]:
    """Per group, the normalised scores of its representatives, stacked.

    Args:
      pool_scores: ``{criterion: {group: scores}}``.
      clusters: per group, its clustering; its representatives are the candidates.
      normalization: a key of `NORMALIZATIONS` ("rank": ranks scaled to [0, 1]).

    Returns:
      Per group, a float64 array (k representatives, group size), in representative order.
    """
    normalize = NORMALIZATIONS[normalization]
    out = {}
    for group, layer in clusters.items():
        rows = [
            normalize({group: pool_scores[name][group]})[group] for name in layer.representatives
        ]
        out[group] = np.stack(rows).astype(np.float64)
    return out


def blend(
    candidates: Mapping[str, np.ndarray], layout: GenomeLayout, genomes: np.ndarray
) -> dict[str, np.ndarray]:
    """Blended scores of a population: ``sum_k f_{l,k} * candidate_{l,k}`` per group.

    Args:
      candidates: per group, (k, size) normalised candidate scores.
      layout: the genome layout (groups and their candidates, in gene order).
      genomes: (population, layout.size) factors, or one genome (layout.size,).

    Returns:
      Per group, (population, size) blended scores (or (size,) for one genome).
    """
    genomes = np.asarray(genomes, np.float64)
    single = genomes.ndim == 1
    genomes = np.atleast_2d(genomes)
    if genomes.shape[1] != layout.size:
        raise ValueError(f"Genomes have {genomes.shape[1]} genes; the layout has {layout.size}.")
    out = {g: genomes[:, part] @ candidates[g] for g, part in layout.slices().items()}
    return {g: s[0] for g, s in out.items()} if single else out


def population_masks(
    graph: ChannelGraph,
    blended: Mapping[str, np.ndarray],
    selection: Selection,
) -> dict[str, np.ndarray]:
    """The masks each candidate's blended scores give at the target.

    Args:
      graph: the channel graph.
      blended: per group, (population, size) blended scores.
      selection: the ratio, scope, ranking and minimum.

    Returns:
      ``{group: (population, size)}`` float32 masks, 1 where a channel is kept.
    """
    population = next(iter(blended.values())).shape[0]
    stack = {g: np.zeros((population, graph[g].size), np.float32) for g in blended}
    for p in range(population):
        keep = keep_from_scores(graph, {g: s[p] for g, s in blended.items()}, selection)
        for group, indices in keep.items():
            stack[group][p, indices] = 1.0
    return stack


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def fitness_keys(accuracy: np.ndarray, loss: np.ndarray, kind: str) -> np.ndarray:
    """Fitness keys compared lexicographically, higher better: the primary metric first.

    Args:
      accuracy: (population,) accuracies.
      loss: (population,) mean losses.
      kind: "accuracy" (keys ``[accuracy, -loss]``) or "loss" (``[-loss, accuracy]``).

    Returns:
      float64 array (population, 2).
    """
    accuracy, loss = np.asarray(accuracy, np.float64), np.asarray(loss, np.float64)
    columns = (accuracy, -loss) if kind == "accuracy" else (-loss, accuracy)
    return np.stack(columns, axis=1)


def _search_fingerprint(
    config: BlendingConfig,
    layout: GenomeLayout,
    candidates: Mapping[str, Any],
    inputs: Sequence[str],
) -> str:
    """What a search is: its settings, genome layout, candidate scores and `inputs` (hashes of
    the model and the fitness images), so a run never resumes another search."""
    search = {
        k: v for k, v in dataclasses.asdict(config).items() if k not in ("finetune", "chunk_size")
    }
    digest = hashlib.sha256(json.dumps([search, dataclasses.asdict(layout), list(inputs)]).encode())
    for group in layout.groups:
        digest.update(np.ascontiguousarray(candidates[group], np.float64).tobytes())
    return digest.hexdigest()


def search_factors(
    evaluate: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray, int]],
    graph: ChannelGraph,
    candidates: Mapping[str, np.ndarray],
    layout: GenomeLayout,
    config: BlendingConfig,
    *,
    fingerprint: str,
    run: RunDir | None = None,
    progress: bool = False,
    metrics: MetricsWriter | None = None,
) -> tuple[np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """Runs (or resumes) the genetic algorithm over the calibration factors.

    Args:
      evaluate: masks stack -> (accuracy, loss, distinct candidates evaluated).
      graph: the channel graph.
      candidates: per group, (k, size) normalised candidate scores.
      layout: the genome layout.
      config: the search settings.
      fingerprint: identifies this search in its checkpoints.
      run: the run directory each generation is saved in (None: no checkpoints).
      progress: show a progress bar with the best fitness so far and the generation's mean.
      metrics: a live metrics writer: one "search" record per generation, at step
        generation + 1.

    Returns:
      (best genome, its fitness record, history).

    Raises:
      SearchCheckpointError: `run` holds another search's generations.
    """
    settings = config.evolution
    selection = select_groups_config(config)
    state = load_search(run, fingerprint) if run is not None else None
    if state is None:
        population = evolution.initial_population(settings, layout.size, config.seed)
        generation, history, best = 0, [], None
    else:
        population = np.asarray(state["population"], np.float64)
        generation, history, best = state["generation"], state["history"], state["best"]
    metric = "accuracy" if config.fitness == "accuracy" else "loss"
    bar = tqdm(
        total=settings.generations,
        initial=generation,
        unit="gen",
        desc="blending search",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        if best is not None:
            bar.set_postfix(best=f"{best[metric]:.4f}", refresh=False)
        while generation < settings.generations:
            began = time.perf_counter()
            masks = population_masks(graph, blend(candidates, layout, population), selection)
            accuracy, loss, distinct = evaluate(masks)
            keys = fitness_keys(accuracy, loss, config.fitness)
            top = int(evolution.best_first(keys)[0])
            if best is None or tuple(keys[top]) > tuple(
                fitness_keys([best["accuracy"]], [best["loss"]], config.fitness)[0]
            ):
                best = {
                    "genome": population[top].tolist(),
                    "accuracy": float(accuracy[top]),
                    "loss": float(loss[top]),
                    "generation": generation,
                }
            history.append(
                {
                    "generation": generation,
                    "best_accuracy": float(accuracy[top]),
                    "best_loss": float(loss[top]),
                    "mean_accuracy": float(np.mean(accuracy)),
                    "mean_loss": float(np.mean(loss)),
                    "best_so_far": best[metric],
                    "distinct_candidates": int(distinct),
                    "sigma": evolution.sigma_at(settings, generation),
                    "seconds": time.perf_counter() - began,
                }
            )
            # Logged before the checkpoint: a resume re-runs whatever the log may lack.
            if metrics is not None:
                record = history[-1]
                metrics.write(
                    generation + 1,
                    "search",
                    **{k: record[k] for k in ("best_accuracy", "best_loss", "mean_accuracy",
                                              "mean_loss", "best_so_far", "sigma")},
                )  # fmt: skip
            if generation + 1 < settings.generations:
                population = evolution.next_generation(
                    population, keys, settings, seed=config.seed, generation=generation
                )
            generation += 1
            if run is not None:
                save_search(
                    run,
                    {
                        "fingerprint": fingerprint,
                        "generation": generation,
                        "population": population.tolist(),
                        "best": best,
                        "history": history,
                        "rng": {"seed": config.seed, "next_generation": generation},
                    },
                )
            bar.update(1)
            release_compiled_programs_if_crowded()
            mean = np.mean(accuracy if metric == "accuracy" else loss)
            bar.set_postfix(best=f"{best[metric]:.4f}", mean=f"{mean:.4f}", refresh=False)
    return np.asarray(best["genome"], np.float64), best, history


def blending_prune(
    model: Model,
    variables: Mapping[str, Any],
    data: Any,
    config: BlendingConfig = BlendingConfig(),
    *,
    workdir: str | None = None,
    progress: bool = True,
) -> PruneResult:
    """Scores, clusters, searches the calibration factors, prunes with the best blend, and
    fine-tunes.

    Works on any model: the criteria, the fitness (masked forward passes) and the pruned
    program only call `model` through its apply function and evaluation keywords.

    Args:
      model: the model (`jaxprune.Model`: linen, NNX or any apply function).
      variables: its trained variables.
      data: the criteria and the fitness read the first `score_examples` and
        `fitness_examples` images of ``data.validation()`` (never the test split); the
        fine-tuning reads ``data.train(epoch)``. See `methods.contract.as_prune_data`.
      config: pool, clustering, search, target and fine-tuning.
      workdir: where the run keeps the pool's scores, the search's generations, the
        fine-tuning's checkpoints and ``result.json``; rerunning resumes, and another run
        there is refused. None: nothing kept.
      progress: progress bars over generations and fine-tuning.

    Returns:
      A `PruneResult`: the pruned program and its final variables, the kept channels, one
      history record per generation, and a summary with the cost, the validation metrics
      before pruning, after pruning (``"pruned"``, before fine-tuning) and at the end, the
      fine-tuning's history, and the method's report (``summary["method"]``: pool, factors,
      clusters, best fitness, generations).

    Raises:
      ValueError: a bad config (before any work), or a pool that scores no group.
      jaxprune.run.RunMismatchError: the workdir holds another run.
    """
    config.check()
    pool = pool_names(config)
    data = as_prune_data(data, batch_size=config.batch_size, seed=config.seed)
    graph = channel_graph(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
    selection = select_groups_config(config)
    groups = select_groups(graph, config.scope)
    if not groups:
        raise ValueError(f"The model has no group of scope {config.scope!r} to prune.")
    wanted = max(config.score_examples, config.fitness_examples)
    images = first_examples(data.validation(), wanted, config.batch_size)  # one read
    score_batches = first_examples(images, config.score_examples, config.batch_size)
    fitness_batches = first_examples(images, config.fitness_examples, config.batch_size)
    inputs = {
        "variables": fingerprint(variables),
        "score_data": fingerprint(score_batches),
        "fitness_data": fingerprint(fitness_batches),
    }
    identity = {"config": config_identity(config, _COSMETIC), **inputs}
    with RunDir.maybe(workdir, kind="blending", identity=identity) as run:
        context = criteria.ScoringContext(model.apply_fn, graph, apply_kwargs=model.eval_kwargs)
        scores_identity = {
            "pool": list(pool),
            "variables": inputs["variables"],
            "score_data": inputs["score_data"],
        }
        pool_scores = cached_pool_scores(
            context, variables, score_batches, pool, run, scores_identity
        )
        groups = [g for g in groups if any(g in pool_scores[n] for n in pool)]
        if not groups:
            raise ValueError(f"No group of scope {config.scope!r} is scored by the pool {pool}.")
        clusters = cluster_pool({n: pool_scores[n] for n in pool}, groups, config.clustering)
        candidates = candidate_scores(pool_scores, clusters, config.normalization)
        layout = GenomeLayout(
            groups=tuple(groups), candidates=tuple(clusters[g].representatives for g in groups)
        )
        chunk_fn = make_chunk_fn(model.apply_fn, graph, apply_kwargs=model.eval_kwargs)
        mesh = default_mesh()

        def evaluate(masks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
            found = population_fitness(
                chunk_fn, variables, masks, fitness_batches, chunk_size=config.chunk_size, mesh=mesh
            )
            return found.accuracy, found.loss, found.evaluated

        search = _search_fingerprint(
            config, layout, candidates, (inputs["variables"], inputs["fitness_data"])
        )
        saved = load_search(run, search) if run is not None and run.resumed else None
        generations_done = saved["generation"] if saved is not None else 0
        metrics = open_metrics(run, generations_done + checkpointed_steps(run, "finetune"))
        genome, best, history = search_factors(
            evaluate,
            graph,
            candidates,
            layout,
            config,
            fingerprint=search,
            run=run,
            progress=progress,
            metrics=metrics,
        )
        keep = keep_from_scores(graph, blend(candidates, layout, genome), selection)
        pruned = prune(variables, graph, keep)
        small = model.with_apply_fn(pruned.apply_fn)
        final, tuning = pruned.variables, []
        if config.finetune is not None:
            final, tuning = fit(
                small,
                pruned.variables,
                data,
                config.finetune,
                run=run,
                name="finetune",
                progress=progress,
                metrics=metrics,
                step_offset=len(history),
            )
        summary = finetuned_summary(model, variables, small, pruned.variables, final, data, tuning)
        summary["method"] = {
            "name": "blending",
            "pool": list(pool),
            "factors": layout.factors(genome),
            "clusters": {g: c.to_dict() for g, c in clusters.items()},
            "best": best,
            "generations": len(history),
        }
        write_result(metrics, len(history) + (tuning[-1]["step"] if tuning else 0) + 1, summary)
        if run is not None:
            run.write_json("result.json", summary)
    return PruneResult("blending", small, final, keep, graph, tuple(history), summary)


def cached_pool_scores(
    context: criteria.ScoringContext,
    variables: Any,
    batches: Sequence[Mapping[str, Any]],
    pool: Sequence[str],
    run: RunDir | None,
    identity: Mapping[str, Any],
) -> PoolScores:
    """The pool's scores, read from the run directory when it holds them for `identity` (the
    model, the score images and the pool); otherwise scored and stored. A damaged or foreign
    ``pool_scores.json`` is scored again.

    Args:
      context: the model and its graph.
      variables: the model variables.
      batches: the score images' batches.
      pool: criterion names.
      run: the run directory (None: always score).
      identity: what the scores depend on.

    Returns:
      ``{criterion: {group: float64 scores}}`` in pool order.
    """
    if run is not None:
        stored = run.artifact(POOL_SCORES_FILE, identity)
        if isinstance(stored, Mapping) and all(name in stored for name in pool):
            return {
                name: {g: np.asarray(v, np.float64) for g, v in stored[name].items()}
                for name in pool
            }
    scores = score_pool(context, variables, batches, pool)
    scores = {
        n: {g: np.asarray(v, np.float64) for g, v in per.items()} for n, per in scores.items()
    }
    if run is not None:
        run.save_artifact(POOL_SCORES_FILE, identity, scores)
    return scores
