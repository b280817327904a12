"""The seeded genetic algorithm of the blending method."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxprune.methods.evolution import (
    EvolutionConfig,
    best_first,
    check_evolution_config,
    initial_population,
    next_generation,
    sigma_at,
)

CONFIG = EvolutionConfig(population=12, generations=5)


def test_best_first_is_lexicographic_with_ties_to_the_lower_index():
    keys = np.array([[0.5, -1.0], [0.7, -2.0], [0.7, -1.0], [0.5, -1.0]])
    np.testing.assert_array_equal(best_first(keys), [2, 1, 0, 3])
    np.testing.assert_array_equal(best_first(np.array([1.0, 3.0, 2.0])), [1, 2, 0])


def test_initial_population_is_seeded_in_range_and_starts_with_equal_factors():
    a = initial_population(CONFIG, 7, seed=0)
    assert a.shape == (12, 7)
    np.testing.assert_array_equal(a, initial_population(CONFIG, 7, seed=0))
    assert not np.array_equal(a, initial_population(CONFIG, 7, seed=1))
    np.testing.assert_array_equal(a[0], 1.0)
    assert a.min() >= 0.0 and a.max() <= 1.0


@pytest.mark.parametrize(
    "changes",
    [{}, {"selection": "truncation"}, {"crossover": "blend"}, {"elitism": 0}],
)
def test_next_generation_keeps_the_elite_stays_in_range_and_is_deterministic(changes):
    config = dataclasses.replace(CONFIG, **changes)
    population = initial_population(config, 5, seed=3)
    fitness = np.random.default_rng(0).random(config.population)
    child = next_generation(population, fitness, config, seed=3, generation=2)
    again = next_generation(population, fitness, config, seed=3, generation=2)
    other = next_generation(population, fitness, config, seed=3, generation=3)
    np.testing.assert_array_equal(child, again)
    assert not np.array_equal(child, other)
    assert child.shape == population.shape
    assert child.min() >= config.low and child.max() <= config.high
    order = np.argsort(-fitness, kind="stable")
    np.testing.assert_array_equal(child[: config.elitism], population[order[: config.elitism]])


def test_without_crossover_or_mutation_children_are_copies_of_selected_parents():
    config = dataclasses.replace(CONFIG, crossover_rate=0.0, mutation_rate=0.0, elitism=1)
    population = initial_population(config, 4, seed=0)
    fitness = np.arange(config.population, dtype=float)
    child = next_generation(population, fitness, config, seed=0, generation=0)
    rows = {tuple(r) for r in population}
    assert all(tuple(r) in rows for r in child)
    # Truncation to the single best genome makes every child its copy.
    best_only = dataclasses.replace(config, selection="truncation", truncation_fraction=0.01)
    child = next_generation(population, fitness, best_only, seed=0, generation=0)
    np.testing.assert_array_equal(child, np.repeat(population[-1:], config.population, axis=0))


def test_random_search_draws_fresh_uniform_genomes_whatever_the_fitness():
    config = dataclasses.replace(CONFIG, strategy="random", low=0.25, high=0.75)
    population = initial_population(config, 6, seed=2)
    fitness = np.random.default_rng(1).random(config.population)
    child = next_generation(population, fitness, config, seed=2, generation=1)
    # A function of (seed, generation) only: neither the population nor the fitness matters.
    reordered = next_generation(population[::-1], -fitness, config, seed=2, generation=1)
    np.testing.assert_array_equal(child, reordered)
    assert not np.array_equal(child, next_generation(population, fitness, config, seed=2,
                                                     generation=2))  # fmt: skip
    assert child.shape == population.shape
    assert child.min() >= 0.25 and child.max() <= 0.75
    # No genome survives: every row is a new draw.
    assert not {tuple(r) for r in child} & {tuple(r) for r in population}
    # Uniform: 10,000 genes have the uniform's mean and spread.
    many = next_generation(
        np.zeros((12, 1000)), fitness, dataclasses.replace(config, low=0.0, high=1.0), seed=0,
        generation=0,
    )  # fmt: skip
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.std() - np.sqrt(1 / 12)) < 0.01


def test_sigma_decays_geometrically():
    assert sigma_at(CONFIG, 0) == CONFIG.mutation_sigma
    assert sigma_at(CONFIG, 3) == pytest.approx(CONFIG.mutation_sigma * CONFIG.sigma_decay**3)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"population": 1}, "population"),
        ({"strategy": "annealing"}, "strategy must be one of"),
        ({"selection": "roulette"}, "selection must be one of"),
        ({"crossover": "one_point"}, "crossover must be one of"),
        ({"tournament_size": 13}, "tournament_size"),
        ({"elitism": 12}, "elitism"),
        ({"mutation_rate": 1.5}, "mutation_rate is a probability"),
        ({"low": 1.0, "high": 0.0}, "low must be below high"),
    ],
)
def test_bad_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        check_evolution_config(dataclasses.replace(CONFIG, **changes))
