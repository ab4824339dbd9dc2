"""`orstack merge`'s typed config and the recipe it applies to each tensor."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from orstack.errors import BadInput

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

METHODS = ("linear", "slerp", "task-arithmetic", "ties", "dare-ties", "dare-linear")
TASK_VECTOR_METHODS = ("task-arithmetic", "ties", "dare-ties", "dare-linear")
DENSITY_METHODS = ("ties", "dare-ties", "dare-linear")
DEFAULT_DENSITY = 0.5
LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Tensors before the first decoder layer (they take the first SLERP factor; the others the last).
EMBEDDING_NAMES = re.compile(r"embed|wte|wpe|tok_embeddings")


@dataclass
class MergeConfig:
    """Every option of `orstack merge` that changes its output; written as the manifest's args.

    `weights` None means equal weights; `density` None means DEFAULT_DENSITY for every model
    (one value applies to all); `t` holds SLERP's factors: one for every tensor, or several
    spread evenly over the decoder layers (interpolated between them)."""

    models: list[str] = field(default_factory=list)
    method: str = "linear"
    weights: list[float] | None = None
    base: str | None = None
    density: list[float] | None = None
    lam: float = 1.0  # --lambda: the task-vector methods' scale of the merged task vector
    t: list[float] = field(default_factory=lambda: [0.5])
    fold: bool = False  # LoRA adapters: fold the merged delta into the base (a checkpoint) instead
    rank: int | None = None  # adapter output of a non-linear merge: its rank (None: sum of ranks)
    dtype: str | None = None  # output dtype (None: each tensor's input dtype)
    seed: int = 0  # DARE's random drop
    evolve: bool = False
    tasks: str | None = None  # fitness: bench's verifiers on these tasks (mean score)
    heldout: list[str] | None = None  # fitness: negative perplexity on this text (when no tasks)
    generations: int = 4
    population: int = 8
    sigma: float = 0.2  # the evolution strategy's initial step (genes live in [0, 1])
    max_new_tokens: int = 16
    max_length: int = 512  # --heldout perplexity window
    log: str | None = None  # --evolve: a JSONL row per candidate
    force: bool = False

    def check(self) -> None:
        """Option checks that need no file: before anything is read."""
        if self.method not in METHODS:
            raise BadInput(f"--method {self.method}: unknown method (use {', '.join(METHODS)})")
        n = len(self.models)
        # One model is a merge only as an adapter folded into its base (--fold) or as one task
        # vector scaled against --base; anything else needs two.
        single_ok = self.fold or (self.method in TASK_VECTOR_METHODS and self.base is not None)
        if n < 2 and not (n == 1 and single_ok):
            raise BadInput(f"merge needs at least two models, got {n}"
                           + (" (one is enough only for an adapter with --fold, or with --base and a task-vector "
                              "method)" if n == 1 else ""))
        if self.method == "slerp" and n != 2:
            raise BadInput(f"--method slerp interpolates between exactly two models, got {n}")
        if self.weights is not None:
            if len(self.weights) != n:
                raise BadInput(f"--weights: {len(self.weights)} given for {n} models (one per model)")
            if any(w < 0 for w in self.weights) and self.method == "linear":
                raise BadInput("--weights: linear merge weights must not be negative")
            if self.method == "linear" and sum(self.weights) <= 0:
                raise BadInput("--weights: linear merge weights must not sum to zero")
        if self.method == "slerp" and self.weights is not None:
            raise BadInput("--weights does not apply to slerp (its factor is --t)")
        if self.density is not None:
            if self.method not in DENSITY_METHODS:
                raise BadInput(f"--density applies to {', '.join(DENSITY_METHODS)}, not {self.method}")
            if len(self.density) not in (1, n):
                raise BadInput(f"--density: {len(self.density)} given for {n} models (one, or one per model)")
            if any(not 0 < d <= 1 for d in self.density):
                raise BadInput("--density: each value must be in (0, 1]")
        if any(not 0 <= t <= 1 for t in self.t) or not self.t:
            raise BadInput("--t: SLERP factors must be in [0, 1]")
        if self.method not in TASK_VECTOR_METHODS and self.lam != 1.0:
            raise BadInput(f"--lambda applies to {', '.join(TASK_VECTOR_METHODS)}, not {self.method}")
        if self.rank is not None and self.rank < 1:
            raise BadInput("--rank must be at least 1")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise BadInput(f"--dtype {self.dtype}: use float32, float16 or bfloat16")
        if self.evolve:
            if self.tasks is None and not self.heldout:
                raise BadInput("--evolve needs a fitness: --tasks TASKS.jsonl or --heldout TEXT")
            if self.generations < 1 or self.population < 2:
                raise BadInput("--evolve needs --generations >= 1 and --population >= 2")
        if self.tasks is not None and self.heldout:
            raise BadInput("--tasks and --heldout are two fitnesses: give one")
        if self.log is not None and not self.evolve:
            raise BadInput("--log records the evolution's candidates: it needs --evolve")

    def weight_list(self) -> list[float]:
        n = len(self.models)
        return list(self.weights) if self.weights is not None else [1.0 / n if self.method == "linear" else 1.0] * n

    def density_list(self) -> list[float]:
        n = len(self.models)
        if self.density is None:
            return [DEFAULT_DENSITY] * n
        return list(self.density) * n if len(self.density) == 1 else list(self.density)

    def recipe(self, n_layers: int) -> Recipe:
        return Recipe(self.method, self.weight_list(), self.density_list(), self.lam, list(self.t), n_layers,
                      self.seed)

    def with_recipe(self, recipe: Recipe) -> MergeConfig:
        """This config with `recipe`'s numbers and no search: what reproduces an evolved merge."""
        return replace(self, weights=[round(w, 6) for w in recipe.weights],
                       density=[round(d, 6) for d in recipe.densities] if self.method in DENSITY_METHODS else None,
                       lam=round(recipe.lam, 6), t=[round(t, 6) for t in recipe.t], evolve=False, log=None,
                       generations=MergeConfig.generations, population=MergeConfig.population)


@dataclass
class Recipe:
    """The numbers a merge applies: what --evolve searches over."""

    method: str
    weights: list[float]
    densities: list[float]
    lam: float
    t: list[float]  # SLERP factors, spread over the decoder layers
    n_layers: int
    seed: int

    def slerp_t(self, name: str) -> float:
        """The SLERP factor of one tensor: a decoder layer's from its index, interpolated between
        the factors; embeddings take the first, everything after the layers the last."""
        if len(self.t) == 1:
            return self.t[0]
        match = LAYER_INDEX.search(name)
        if match is None:
            return self.t[0] if EMBEDDING_NAMES.search(name) else self.t[-1]
        position = int(match.group(1)) / max(self.n_layers - 1, 1)
        span = position * (len(self.t) - 1)
        low = min(int(span), len(self.t) - 2)
        return self.t[low] + (span - low) * (self.t[low + 1] - self.t[low])

    def apply(self, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """The merged tensor (float32) of one name."""
        from orstack.merge import methods

        if self.method == "linear":
            return methods.linear(tensors, self.weights)
        if self.method == "slerp":
            return methods.slerp(tensors[0], tensors[1], self.slerp_t(name))
        assert base is not None
        if self.method == "task-arithmetic":
            return methods.task_arithmetic(base, tensors, self.weights, self.lam)
        if self.method == "ties":
            return methods.ties(base, tensors, self.weights, self.densities, self.lam)
        if self.method == "dare-linear":
            return methods.dare_linear(base, tensors, self.weights, self.densities, self.lam, self.seed, name)
        return methods.dare_ties(base, tensors, self.weights, self.densities, self.lam, self.seed, name)
