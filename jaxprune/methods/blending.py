"""Blending pruning criteria with an evolutionary search (He et al., ICANN 2021, arXiv 2107.05033).

1. Score every channel with each criterion of a pool (the paper's 12 by default).
2. Per layer, cluster the criteria by the rank similarity of their scores and keep one
   representative per cluster (`blending_clusters`).
3. The blended score of channel c of layer l is ``sum_k f_{l,k} * norm(s_{l,k})_c`` over the
   layer's representatives k, with ``norm`` a per-layer normalisation (ranks scaled to [0, 1]
   by default) and f the calibration factors.
4. A seeded genetic algorithm (`evolution`) searches the factors. A genome's fitness is the
   accuracy (ties broken by loss) of the network pruned with its blended scores at the target
   ratio, without fine-tuning, on fixed validation images; the whole population runs in one
   vmapped call over masks per batch (`blending_fitness`). Each generation is checkpointed
   (`blending_checkpoint`), so a killed search resumes and ends identically.
5. The best factors prune the model (`surgery.prune`); fine-tuning follows in the caller
   (`jaxprune.commands.run_blending` fine-tunes zoo models).

Choices the paper leaves open, ours and each a knob (`BlendingConfig`, `ClusterConfig`,
`EvolutionConfig`):

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

Example::

  graph = channel_graph(model.apply, variables, x)
  result = blending_prune(model.apply, graph, variables, score_batches, fitness_batches,
                          config=BlendingConfig(ratio=0.5), workdir="workdirs/blend")
  result.pruned.variables, result.pruned.widths, result.factors
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxprune import checkpoint, criteria, train
from jaxprune.graph import ChannelGraph
from jaxprune.methods import evolution
from jaxprune.methods.blending_checkpoint import load_search, save_search
from jaxprune.methods.blending_clusters import (
    ClusterConfig,
    LayerClusters,
    check_cluster_config,
    cluster_layer,
)
from jaxprune.methods.blending_fitness import make_chunk_fn, population_fitness
from jaxprune.methods.evolution import EvolutionConfig
from jaxprune.methods.oneshot import OneShotConfig, keep_from_scores, select_groups
from jaxprune.surgery import Pruned, prune

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


@dataclasses.dataclass(frozen=True)
class BlendingConfig:
    """The pool, the clustering, the search and the pruning target."""

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
    # Batch size of scoring and of the fitness evaluation. Kept at 250: on a CPU, the fitness
    # at one candidate per call showed no consistent order among batches of 64, 128 and 256
    # (experiments/bench/population.py); scoring was not measured.
    batch_size: int = 250
    # Candidates per vmapped fitness call (activations scale with it); 0: automatic
    # (`blending_fitness.auto_chunk_size`): 1 on a CPU, where wider chunks measured 1.2-3.6x
    # slower (experiments/bench/population.py), up to 32 on accelerators (not measured here).
    chunk_size: int = 0
    # Epochs of fine-tuning after pruning (SGD, momentum 0.9, cosine); 0: none.
    finetune_epochs: int = 1
    # Peak learning rate of that fine-tuning.
    finetune_lr: float = 0.01
    # Fine-tune on a fixed subset of this many training images (0: the whole split).
    finetune_examples: int = 0
    # Seed of the search and of the fine-tuning.
    seed: int = 0


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


@dataclasses.dataclass(frozen=True)
class BlendingResult:
    """What `blending_prune` found and did.

    Attributes:
      pruned: the pruned variables, width spec and keep indices (`surgery.Pruned`).
      factors: the best calibration factors, ``{group: {criterion: factor}}``.
      clusters: each pruned group's criteria clustering.
      scores: the best blended scores per group.
      history: one record per generation (best and mean fitness, distinct candidates, time).
      best: the best genome's fitness and the generation it appeared in.
    """

    pruned: Pruned
    factors: dict[str, dict[str, float]]
    clusters: dict[str, LayerClusters]
    scores: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    best: dict[str, Any]


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
      config: the settings, nested clustering and evolution settings included.

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
    if config.finetune_epochs < 0 or config.finetune_examples < 0:
        raise ValueError("finetune_epochs and finetune_examples must be >= 0.")
    if config.finetune_epochs > 0 and not config.finetune_lr > 0:
        raise ValueError(
            f"finetune_lr must be > 0 to fine-tune, got {config.finetune_lr}; or set "
            "finetune_epochs=0."
        )
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


def select_groups_config(config: BlendingConfig) -> OneShotConfig:
    """The selection (ratio, scope, ranking, minimum) as the one-shot methods express it.

    Args:
      config: the blending settings.

    Returns:
      The `OneShotConfig` that `oneshot.keep_from_scores` applies to blended scores.

    Raises:
      ValueError: an unknown ranking or scope.
    """
    if config.ranking not in ("per_layer", "global"):
        raise ValueError(f"ranking must be 'per_layer' or 'global', got {config.ranking!r}.")
    if config.scope not in ("conv", "all"):
        raise ValueError(f"scope must be 'conv' or 'all', got {config.scope!r}.")
    return OneShotConfig(
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
    selection: OneShotConfig,
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


def _fingerprint(
    config: BlendingConfig,
    layout: GenomeLayout,
    candidates: Mapping[str, Any],
    inputs: Sequence[str],
) -> str:
    """What a search is: its settings, genome layout, candidate scores and `inputs` (hashes of
    the model and the fitness images), so a workdir never resumes another search."""
    search = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("finetune_epochs", "finetune_lr", "finetune_examples", "chunk_size")
    }
    digest = hashlib.sha256(json.dumps([search, dataclasses.asdict(layout), list(inputs)]).encode())
    for group in layout.groups:
        digest.update(np.ascontiguousarray(candidates[group], np.float64).tobytes())
    return digest.hexdigest()


def _reiterable(batches: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """Batches that can be iterated once per generation (a one-shot iterator is kept in a list)."""
    return list(batches) if iter(batches) is batches else batches


def search_factors(
    evaluate: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray, int]],
    graph: ChannelGraph,
    candidates: Mapping[str, np.ndarray],
    layout: GenomeLayout,
    config: BlendingConfig,
    *,
    fingerprint: str,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """Runs (or resumes) the genetic algorithm over the calibration factors.

    Args:
      evaluate: masks stack -> (accuracy, loss, distinct candidates evaluated).
      graph: the channel graph.
      candidates: per group, (k, size) normalised candidate scores.
      layout: the genome layout.
      config: the search settings.
      fingerprint: identifies this search in its checkpoints.
      checkpoint_dir: where each generation is saved (None: no checkpoints).
      progress: show a progress bar with the best fitness so far and the generation's mean.

    Returns:
      (best genome, its fitness record, history).
    """
    settings = config.evolution
    selection = select_groups_config(config)
    state = load_search(checkpoint_dir, fingerprint) if checkpoint_dir is not None else None
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
            if generation + 1 < settings.generations:
                population = evolution.next_generation(
                    population, keys, settings, seed=config.seed, generation=generation
                )
            generation += 1
            if checkpoint_dir is not None:
                save_search(
                    checkpoint_dir,
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
            mean = np.mean(accuracy if metric == "accuracy" else loss)
            bar.set_postfix(best=f"{best[metric]:.4f}", mean=f"{mean:.4f}", refresh=False)
    return np.asarray(best["genome"], np.float64), best, history


def blending_prune(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    score_batches: Iterable[Mapping[str, Any]] | None,
    fitness_batches: Iterable[Mapping[str, Any]],
    *,
    config: BlendingConfig = BlendingConfig(),
    workdir: str | Path | None = None,
    pool_scores: PoolScores | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> BlendingResult:
    """Scores, clusters, searches the calibration factors, and prunes with the best blend.

    Works on any model: `apply_fn` and `graph` are all it needs to know about it.

    Args:
      apply_fn: the model function the graph was built from.
      graph: its channel graph (`graph.channel_graph`).
      variables: the trained variables.
      score_batches: validation batches the data criteria read.
      fitness_batches: held-out validation batches of the fitness (re-iterable; a one-shot
        iterator is kept in memory). Never the test split.
      config: pool, clustering, search and target.
      workdir: where each generation is checkpointed (``workdir/search``) and the pool's
        scores are kept (``workdir/pool_scores.npz``); rerunning resumes. None: nothing kept.
      pool_scores: the pool's scores if already computed (``{criterion: {group: scores}}``).
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).
      progress: show a progress bar over generations with the best and mean fitness.

    Returns:
      A `BlendingResult` with the pruned variables, the factors, the clusters and the history.
    """
    check_config(config)
    pool = pool_names(config)
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    context = criteria.ScoringContext(apply_fn, graph, apply_kwargs=kwargs)
    workdir = None if workdir is None else Path(workdir)
    if pool_scores is None:
        pool_scores = _cached_pool_scores(context, variables, score_batches, pool, workdir)
    missing = [name for name in pool if name not in pool_scores]
    if missing:
        raise ValueError(f"pool_scores lacks criteria {missing} of the pool; score them too.")
    selection = select_groups_config(config)
    groups = [
        g for g in select_groups(graph, config.scope) if any(g in pool_scores[n] for n in pool)
    ]
    if not groups:
        raise ValueError(f"No group of scope {config.scope!r} is scored by the pool {pool}.")
    clusters = cluster_pool({n: pool_scores[n] for n in pool}, groups, config.clustering)
    candidates = candidate_scores(pool_scores, clusters, config.normalization)
    layout = GenomeLayout(
        groups=tuple(groups), candidates=tuple(clusters[g].representatives for g in groups)
    )
    fitness_batches = _reiterable(fitness_batches)
    chunk_fn = make_chunk_fn(apply_fn, graph, apply_kwargs=kwargs)
    mesh = train.make_mesh() if jax.device_count() > 1 else None

    def evaluate(masks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
        found = population_fitness(
            chunk_fn, variables, masks, fitness_batches, chunk_size=config.chunk_size, mesh=mesh
        )
        return found.accuracy, found.loss, found.evaluated

    inputs = (
        checkpoint.tree_fingerprint(variables),
        checkpoint.tree_fingerprint(list(fitness_batches)),
    )
    genome, best, history = search_factors(
        evaluate,
        graph,
        candidates,
        layout,
        config,
        fingerprint=_fingerprint(config, layout, candidates, inputs),
        checkpoint_dir=None if workdir is None else workdir / "search",
        progress=progress,
    )
    scores = blend(candidates, layout, genome)
    keep = keep_from_scores(graph, scores, selection)
    return BlendingResult(
        pruned=prune(variables, graph, keep),
        factors=layout.factors(genome),
        clusters=clusters,
        scores=scores,
        history=history,
        best=best,
    )


def _cached_pool_scores(
    context: criteria.ScoringContext,
    variables: Any,
    batches: Iterable[Mapping[str, Any]] | None,
    pool: Sequence[str],
    workdir: Path | None,
) -> PoolScores:
    """Scores the pool, or reads the scores a previous run of this workdir stored for the same
    variables and score images (other ones are scored afresh and replace them)."""
    path = None if workdir is None else workdir / "pool_scores.npz"
    batches = list(batches) if batches is not None else None
    inputs = checkpoint.tree_fingerprint(variables) + checkpoint.tree_fingerprint(batches or [])
    if path is not None and path.is_file():
        with np.load(path) as stored:
            found: PoolScores = {}
            for key in stored.files:
                if key != _INPUTS_KEY:
                    name, group = key.split("/", 1)
                    found.setdefault(name, {})[group] = stored[key]
            same_inputs = _INPUTS_KEY in stored.files and str(stored[_INPUTS_KEY]) == inputs
        if same_inputs and all(name in found for name in pool):
            return found
    scores = score_pool(context, variables, batches, pool)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name("pool_scores.tmp.npz")
        arrays = {f"{n}/{g}": s for n, per in scores.items() for g, s in per.items()}
        np.savez(temporary, **arrays, **{_INPUTS_KEY: np.asarray(inputs)})
        temporary.replace(path)
    return scores


# The entry of pool_scores.npz that names the variables and score images the scores belong to.
_INPUTS_KEY = "__inputs_sha256__"
