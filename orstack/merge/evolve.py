"""`--evolve`: a seeded evolution strategy over a merge's recipe, scored in memory.

The genes are the recipe's numbers mapped to [0, 1]: one weight per model (linear: the mix;
the task-vector methods: each task vector's weight, scaled by lambda in [0, 2]), one density
per model (TIES, DARE: 0.05 + 0.95 g) and SLERP's factors (one per decoder layer). The
strategy is a (mu, lambda) evolution strategy with an elite: generation 0 is the recipe given
on the command line plus P - 1 Gaussian mutations of it; each later generation keeps the best
candidate so far and samples P - 1 around the mean of the best quarter, with the step sigma
grown by 1.2 after a generation that improved on the best and shrunk by 0.8 after one that
did not (a one-fifth-rule style adaptation). Every candidate is merged into the one resident
model and scored by the fitness; a row per candidate goes to the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from orstack import console
from orstack.merge.config import DENSITY_METHODS, TASK_VECTOR_METHODS, Recipe

MIN_DENSITY = 0.05
MAX_LAMBDA = 2.0


def gene_count(recipe: Recipe) -> int:
    n = len(recipe.weights)
    if recipe.method == "slerp":
        return len(recipe.t)
    return n + (n if recipe.method in DENSITY_METHODS else 0) + (1 if recipe.method in TASK_VECTOR_METHODS else 0)


def encode(recipe: Recipe) -> np.ndarray:
    if recipe.method == "slerp":
        return np.array(recipe.t, dtype=float)
    genes = [min(max(w, 0.0), 1.0) for w in recipe.weights]
    if recipe.method in DENSITY_METHODS:
        genes += [(d - MIN_DENSITY) / (1 - MIN_DENSITY) for d in recipe.densities]
    if recipe.method in TASK_VECTOR_METHODS:
        genes.append(recipe.lam / MAX_LAMBDA)
    return np.clip(np.array(genes, dtype=float), 0.0, 1.0)


def decode(genes: np.ndarray, like: Recipe) -> Recipe:
    g = [float(x) for x in np.clip(genes, 0.0, 1.0)]
    if like.method == "slerp":
        return replace(like, t=g)
    n = len(like.weights)
    weights = g[:n]
    if like.method == "linear" and sum(weights) <= 0:
        weights = [1.0 / n] * n
    densities = list(like.densities)
    if like.method in DENSITY_METHODS:
        densities = [MIN_DENSITY + (1 - MIN_DENSITY) * x for x in g[n:2 * n]]
    lam = g[-1] * MAX_LAMBDA if like.method in TASK_VECTOR_METHODS else like.lam
    return replace(like, weights=weights, densities=densities, lam=lam)


@dataclass
class Candidate:
    generation: int
    index: int
    recipe: Recipe
    fitness: float
    seconds: float


def describe(recipe: Recipe) -> dict[str, Any]:
    """The recipe's searched numbers, rounded, for logs and the manifest."""
    out: dict[str, Any] = {"method": recipe.method}
    if recipe.method == "slerp":
        out["t"] = [round(t, 4) for t in recipe.t]
        return out
    out["weights"] = [round(w, 4) for w in recipe.weights]
    if recipe.method in DENSITY_METHODS:
        out["density"] = [round(d, 4) for d in recipe.densities]
    if recipe.method in TASK_VECTOR_METHODS:
        out["lambda"] = round(recipe.lam, 4)
    return out


def evolve(start: Recipe, fitness: Callable[[Recipe], float], *, generations: int, population: int, sigma: float,
           seed: int, log: Callable[[dict[str, Any]], None] | None = None) -> tuple[Candidate, list[Candidate]]:
    """(best candidate, every candidate) of the search from `start`."""
    rng = np.random.default_rng(seed)
    dims = gene_count(start)
    mean = encode(start)
    total = population + (generations - 1) * (population - 1)  # the elite is carried, not re-scored
    seen: list[Candidate] = []
    best: Candidate | None = None
    began = time.perf_counter()
    for generation in range(generations):
        if generation == 0:
            genomes = [mean] + [np.clip(mean + sigma * rng.standard_normal(dims), 0, 1) for _ in range(population - 1)]
        else:
            genomes = [np.clip(mean + sigma * rng.standard_normal(dims), 0, 1) for _ in range(population - 1)]
        scored: list[Candidate] = [] if best is None else [best]
        improved = False
        for genes in genomes:
            recipe = decode(genes, start)
            t0 = time.perf_counter()
            value = fitness(recipe)
            cand = Candidate(generation, len(seen), recipe, value, time.perf_counter() - t0)
            seen.append(cand)
            scored.append(cand)
            if best is None or value > best.fitness:
                improved = best is not None
                best = cand
            row = {"generation": generation, "candidate": cand.index, **describe(recipe),
                   "fitness": round(value, 6), "best": round(best.fitness, 6), "seconds": round(cand.seconds, 2)}
            if log is not None:
                log(row)
            elapsed = time.perf_counter() - began
            eta = elapsed / len(seen) * (total - len(seen))
            console.info(f"evolve {len(seen)}/{total} (generation {generation + 1}/{generations}): fitness "
                         f"{value:.4f}, best {best.fitness:.4f}; {len(seen) / elapsed:.2f} candidates/s, "
                         f"eta {eta:.0f} s")
        scored.sort(key=lambda c: -c.fitness)
        parents = scored[:max(1, population // 4)]
        mean = np.mean([encode(c.recipe) for c in parents], axis=0)
        sigma *= 1.2 if improved else 0.8
    assert best is not None
    return best, seen
