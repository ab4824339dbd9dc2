"""What a merge reads and makes: the plan (inputs checked against each other) and the streams of
merged tensors it writes or scores.

Two shapes of merge:
- full weights: checkpoints (adapters among them, or all adapters with `--fold`, seen as the
  checkpoints they make), merged tensor by tensor into a checkpoint;
- adapter space: LoRA adapters of one base merged into one adapter. Each module's deltas
  delta_i = scale_i B_i A_i are the task vectors; linear and task-arithmetic merges are exact as
  a concatenation of the factors (rank = sum of ranks), the others are merged dense and cut
  back to a rank by SVD (the relative error is reported).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orstack.errors import BadInput
from orstack.merge.config import TASK_VECTOR_METHODS, MergeConfig, Recipe
from orstack.merge.sources import (
    Adapter,
    Checkpoint,
    Folded,
    check_adapters,
    check_fit,
    check_tokenizers,
    is_float,
    open_checkpoint,
    open_input,
    tokenizer_dir,
)

if TYPE_CHECKING:
    import torch

    Source = Checkpoint | Folded


@dataclass
class Plan:
    inputs: list[Checkpoint | Adapter]  # as named by the user
    sources: list[Source]  # full-weight view of each input
    base: Source | None  # task vectors are taken against it
    template: Checkpoint  # config, tensor order and the model scored in memory
    tokenizer: Path  # the directory whose tokenizer files the output carries
    adapters: list[Adapter] | None  # set for an adapter-space merge
    n_layers: int

    @property
    def names(self) -> list[str]:
        return list(self.template.tensors)

    @property
    def adapted(self) -> list[str]:
        """Base weight names any adapter changes, in the base's order."""
        assert self.adapters is not None
        touched = {w for a in self.adapters for w in a.modules}
        return [n for n in self.template.tensors if n in touched]

    def parents(self) -> list[str]:
        return [str(i.label) for i in self.inputs]


def build_plan(config: MergeConfig) -> Plan:
    """Open every input (configs and headers only) and check they fit; BadInput otherwise."""
    inputs = [open_input(m, "model") for m in config.models]
    adapters = [i for i in inputs if isinstance(i, Adapter)]
    all_adapters = len(adapters) == len(inputs)
    base: Source | None = None
    if config.base is not None:
        base = open_checkpoint(config.base, "--base")
    if all_adapters:
        check_adapters(adapters)
        if base is None and (config.method in TASK_VECTOR_METHODS or not config.fold):
            base = adapters[0].base
    elif config.method in TASK_VECTOR_METHODS and base is None:
        raise BadInput(f"--method {config.method} needs --base (the model the task vectors are taken against)")
    elif config.fold:
        raise BadInput("--fold folds LoRA adapters into their base; every model must then be an adapter")
    sources: list[Source] = [Folded(i) if isinstance(i, Adapter) else i for i in inputs]
    template = sources[0].adapter.base if isinstance(sources[0], Folded) else sources[0]
    for other in sources[1:] + ([base] if base is not None else []):
        other_ckpt = other.adapter.base if isinstance(other, Folded) else other
        check_fit(template, other_ckpt)
    check_tokenizers(inputs + ([base] if isinstance(base, Checkpoint) and config.base is not None else []))
    n_layers = int(template.config.get("num_hidden_layers") or template.config.get("n_layer") or 1)
    return Plan(inputs, sources, base if config.method in TASK_VECTOR_METHODS or all_adapters else None,
                template, tokenizer_dir(inputs[0]), adapters if all_adapters and not config.fold else None,
                n_layers)


def output_dtype(name: str, tensor: torch.Tensor, dtype: str | None) -> torch.dtype:
    import torch

    return tensor.dtype if dtype is None else getattr(torch, dtype)


def full_weights(plan: Plan, recipe: Recipe, dtype: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every tensor of the model, one name at a time; in an adapter-space
    merge the base's tensors with the merged delta added (the function the adapter computes, before
    any SVD cut)."""
    if plan.adapters is not None:
        assert plan.base is not None
        adapted = set(plan.adapted)
        for name in plan.names:
            weight = plan.base.get(name)
            if name in adapted:
                weight = (weight.float() + merged_delta(plan, recipe, name)).to(weight.dtype)
            yield name, weight if dtype is None else weight.to(output_dtype(name, weight, dtype))
        return
    for name in plan.names:
        tensors = [s.get(name) for s in plan.sources]
        if not is_float(plan.template.tensors[name]):
            yield name, tensors[0]
            continue
        base = plan.base.get(name) if plan.base is not None else None
        yield name, recipe.apply(name, tensors, base).to(output_dtype(name, tensors[0], dtype))


def merged_delta(plan: Plan, recipe: Recipe, weight: str) -> torch.Tensor:
    """The merged delta (float32) of one adapted base weight, the inputs' deltas as task vectors
    (a module an adapter leaves alone has delta 0)."""
    import torch

    assert plan.adapters is not None
    shape = plan.template.tensors[weight].shape
    deltas = [a.delta(weight) for a in plan.adapters]
    deltas = [torch.zeros(shape) if d is None else d for d in deltas]
    zero = torch.zeros(shape)
    return recipe.apply(weight, deltas, zero if recipe.method in TASK_VECTOR_METHODS else None)


def exact_factors(plan: Plan, recipe: Recipe) -> bool:
    """Linear and task-arithmetic merges of adapters are sums of B_i A_i: exact as stacked factors."""
    return recipe.method in ("linear", "task-arithmetic")


def adapter_rank(plan: Plan, config: MergeConfig) -> int:
    assert plan.adapters is not None
    total = sum(a.rank for a in plan.adapters)
    return total if config.rank is None or exact_factors(plan, config.recipe(plan.n_layers)) else config.rank


def adapter_factors(plan: Plan, recipe: Recipe, rank: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(weight name, A [rank, in], B [out, rank], relative Frobenius error of B A against the merged
    delta) per adapted weight; the factors carry every scale (the output's lora_alpha = r)."""
    import torch

    assert plan.adapters is not None
    if recipe.method == "linear":
        total = sum(recipe.weights)
        coefficients = [w / total for w in recipe.weights]
    else:
        coefficients = [w * recipe.lam for w in recipe.weights]
    for weight in plan.adapted:
        out_dim, in_dim = plan.template.tensors[weight].shape
        if exact_factors(plan, recipe):
            a_parts, b_parts = [], []
            for adapter, c in zip(plan.adapters, coefficients):
                ab = adapter.factors(weight)
                a, b = ab if ab is not None else (torch.zeros(adapter.rank, in_dim), torch.zeros(out_dim, adapter.rank))
                a_parts.append(a)
                b_parts.append(b * (c * adapter.scale))
            yield weight, torch.cat(a_parts, 0), torch.cat(b_parts, 1), 0.0
            continue
        delta = merged_delta(plan, recipe, weight)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        b = u[:, :k] * root
        a = root[:, None] * vh[:k]
        if k < rank:  # a delta of lower rank than asked: pad with zero factors
            a = torch.cat([a, torch.zeros(rank - k, in_dim)], 0)
            b = torch.cat([b, torch.zeros(out_dim, rank - k)], 1)
        norm = delta.norm().item()
        error = (delta - b @ a).norm().item() / norm if norm > 0 else 0.0
        yield weight, a, b, error
