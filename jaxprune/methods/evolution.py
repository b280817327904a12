"""A seeded genetic algorithm over real-valued genomes (the calibration factors of blending).

One generation: rank the population by fitness, copy the elite unchanged, and fill the rest
with children of selected parents (tournament or truncation selection, uniform or blend
crossover, Gaussian mutation whose sigma decays each generation), clipped to the genome's
range. Every random draw of generation g comes from a generator seeded with (seed, g), so a
search resumed at generation g continues exactly as an uninterrupted one.

Fitness is a (population, keys) array compared lexicographically, higher better in every key,
e.g. ``[accuracy, -loss]``: accuracy first, loss breaks ties.
"""

from __future__ import annotations

import dataclasses

import numpy as np

STRATEGIES = ("genetic", "random")
SELECTIONS = ("tournament", "truncation")
CROSSOVERS = ("uniform", "blend")
# Separates this module's random stream from other users of the same seed.
_STREAM = 0xB1E7D


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """Population, operators and their rates."""

    # "genetic" (selection, crossover, mutation) or "random": every generation a fresh uniform
    # draw, with the same number of evaluations. Random search is the control that tells
    # whether the genetic operators find better factors than sampling alone.
    strategy: str = "genetic"
    # Genomes per generation.
    population: int = 32
    # Generations evaluated (the first is the initial population).
    generations: int = 20
    # "tournament" (best of `tournament_size` drawn with replacement) or "truncation" (uniform
    # among the best `truncation_fraction`).
    selection: str = "tournament"
    # Contestants per tournament; 3 keeps pressure moderate for a population of 32.
    tournament_size: int = 3
    # Share of the ranked population truncation selection draws from.
    truncation_fraction: float = 0.5
    # Best genomes copied unchanged into the next generation (the best never gets lost).
    elitism: int = 2
    # "uniform" (each gene from either parent) or "blend" (a random convex mix per gene).
    crossover: str = "uniform"
    # Probability that a child is a crossover of two parents, not a copy of one.
    crossover_rate: float = 0.9
    # Probability that each gene of a child is perturbed.
    mutation_rate: float = 0.2
    # Standard deviation of the Gaussian perturbation in generation 0 (factors live in [0, 1]).
    mutation_sigma: float = 0.2
    # Sigma is multiplied by this each generation: broad search first, refinement later.
    sigma_decay: float = 0.95
    # Lower and upper bound of every gene (the calibration factors: non-negative weights).
    low: float = 0.0
    high: float = 1.0
    # Start with one genome of equal factors (the plain sum of the candidates) among the
    # random ones, so the search starts no worse than the unweighted blend.
    include_equal: bool = True


def check_evolution_config(config: EvolutionConfig) -> None:
    """Refuses a bad `EvolutionConfig`.

    Args:
      config: the settings.

    Raises:
      ValueError: naming the bad field and what it must be.
    """
    if config.population < 2:
        raise ValueError(f"population must be >= 2, got {config.population}.")
    if config.generations < 1:
        raise ValueError(f"generations must be >= 1, got {config.generations}.")
    if config.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {config.strategy!r}.")
    if config.selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {config.selection!r}.")
    if config.crossover not in CROSSOVERS:
        raise ValueError(f"crossover must be one of {CROSSOVERS}, got {config.crossover!r}.")
    if not 1 <= config.tournament_size <= config.population:
        raise ValueError(
            f"tournament_size must be in 1..population ({config.population}), got "
            f"{config.tournament_size}."
        )
    if not 0.0 < config.truncation_fraction <= 1.0:
        raise ValueError(
            f"truncation_fraction must be in (0, 1], got {config.truncation_fraction}."
        )
    if not 0 <= config.elitism < config.population:
        raise ValueError(
            f"elitism must be in 0..population-1 ({config.population - 1}), got {config.elitism}."
        )
    for name in ("crossover_rate", "mutation_rate"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {getattr(config, name)}.")
    if config.mutation_sigma < 0 or config.sigma_decay <= 0:
        raise ValueError(
            f"mutation_sigma must be >= 0 and sigma_decay > 0, got {config.mutation_sigma} and "
            f"{config.sigma_decay}."
        )
    if not config.low < config.high:
        raise ValueError(f"low must be below high, got [{config.low}, {config.high}].")


def generation_rng(seed: int, generation: int) -> np.random.Generator:
    """The random generator of one generation: a pure function of (seed, generation).

    Args:
      seed: the search's seed (>= 0).
      generation: the generation whose offspring it draws; -1 for the initial population.

    Returns:
      A fresh `np.random.Generator`.
    """
    if seed < 0 or generation < -1:
        raise ValueError(f"seed must be >= 0 and generation >= -1, got {seed} and {generation}.")
    return np.random.default_rng([_STREAM, int(seed), int(generation) + 1])


def initial_population(config: EvolutionConfig, genome_size: int, seed: int) -> np.ndarray:
    """Uniform random genomes in [low, high]; the first has equal genes when `include_equal`.

    Args:
      config: population size, bounds, `include_equal`.
      genome_size: genes per genome.
      seed: the search's seed.

    Returns:
      float64 array (population, genome_size).
    """
    check_evolution_config(config)
    if genome_size < 1:
        raise ValueError(f"genome_size must be >= 1, got {genome_size}.")
    rng = generation_rng(seed, -1)
    population = rng.uniform(config.low, config.high, size=(config.population, genome_size))
    if config.include_equal:
        population[0] = config.high
    return population


def best_first(fitness: np.ndarray) -> np.ndarray:
    """Indices of genomes from best to worst: lexicographic on the keys, ties to lower index.

    Args:
      fitness: (population,) or (population, keys); higher is better in every key.

    Returns:
      int64 permutation of range(population).
    """
    keys = np.asarray(fitness, np.float64)
    if keys.ndim == 1:
        keys = keys[:, None]
    if np.isnan(keys).any():
        raise ValueError("Fitness contains NaN; evaluate every genome before ranking.")
    # np.lexsort's primary key is the last one: index last-but-tiebreak, then keys reversed.
    columns = [np.arange(keys.shape[0])] + [-keys[:, k] for k in reversed(range(keys.shape[1]))]
    return np.lexsort(columns).astype(np.int64)


def sigma_at(config: EvolutionConfig, generation: int) -> float:
    """The mutation sigma of a generation.

    Args:
      config: `mutation_sigma` and `sigma_decay`.
      generation: 0 for the initial population's offspring.

    Returns:
      ``mutation_sigma * sigma_decay ** generation``.
    """
    return float(config.mutation_sigma * config.sigma_decay**generation)


def _select(
    rng: np.random.Generator, position: np.ndarray, config: EvolutionConfig, count: int
) -> np.ndarray:
    """`count` parent indices; `position[i]` is genome i's place in the ranking (0 = best)."""
    size = position.size
    if config.selection == "tournament":
        contestants = rng.integers(0, size, size=(count, config.tournament_size))
        winners = np.argmin(position[contestants], axis=1)
        return contestants[np.arange(count), winners]
    ranked = np.argsort(position)
    pool = ranked[: max(1, int(round(config.truncation_fraction * size)))]
    return pool[rng.integers(0, pool.size, size=count)]


def next_generation(
    population: np.ndarray,
    fitness: np.ndarray,
    config: EvolutionConfig,
    *,
    seed: int,
    generation: int,
) -> np.ndarray:
    """The population of generation ``generation + 1`` from generation `generation`'s.

    Args:
      population: (population, genome_size) genomes of this generation.
      fitness: their fitness, (population,) or (population, keys), higher better.
      config: the operators.
      seed: the search's seed.
      generation: this generation's number (0 for the initial population).

    Returns:
      The next population, same shape: the elite first (best first), then the children; with
      the "random" strategy, fresh uniform genomes that depend on (seed, generation) only.
    """
    check_evolution_config(config)
    population = np.asarray(population, np.float64)
    if population.shape[0] != config.population or np.shape(fitness)[0] != config.population:
        raise ValueError(
            f"Expected {config.population} genomes and fitness values, got "
            f"{population.shape[0]} and {np.shape(fitness)[0]}."
        )
    rng = generation_rng(seed, generation)
    if config.strategy == "random":
        return rng.uniform(config.low, config.high, size=population.shape)
    order = best_first(fitness)
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    n_children = config.population - config.elitism
    genome_size = population.shape[1]

    first = population[_select(rng, position, config, n_children)]
    second = population[_select(rng, position, config, n_children)]
    crossed = rng.random(n_children) < config.crossover_rate
    if config.crossover == "uniform":
        mix = (rng.random((n_children, genome_size)) < 0.5).astype(np.float64)
    else:
        mix = rng.random((n_children, genome_size))
    mix[~crossed] = 1.0  # no crossover: a copy of the first parent
    children = mix * first + (1.0 - mix) * second

    mutate = rng.random((n_children, genome_size)) < config.mutation_rate
    noise = rng.normal(0.0, sigma_at(config, generation), size=(n_children, genome_size))
    children = np.clip(children + mutate * noise, config.low, config.high)
    return np.concatenate([population[order[: config.elitism]], children], axis=0)
