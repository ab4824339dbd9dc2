"""Pruning a whole model, one decoder layer at a time.

Calibration inputs are captured at the first decoder layer and propagated through the
already-pruned layers (orstack.layerwise), so each layer is pruned for the inputs it will
see, and memory stays at about one layer's activations. Embeddings stay dense; lm_head
too unless asked (`lm_head=True`, only when it is not tied to the embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orstack.errors import BadInput
from orstack.prune.masks import METHODS, check_nm, magnitude_scores, nm_mask, row_mask, wanda_scores

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class PruneSpec:
    """What to prune, and how: the algorithm's whole configuration."""

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: tuple[int, int] | None = None  # (N, M): N zeros in every M inputs; overrides sparsity
    attn_sparsity: float | None = None  # self_attn.* linears; default: sparsity
    mlp_sparsity: float | None = None  # mlp.* linears; default: sparsity
    blocksize: int = 128  # SparseGPT column block
    damp: float = 0.01  # SparseGPT dampening, fraction of mean diag(H)
    batch_size: int = 8  # calibration sequences per forward
    lm_head: bool = False  # also prune lm_head (refused when it is tied to the embeddings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInput(f"--method {self.method}: expected one of {', '.join(METHODS)}")

    def sparsity_for(self, name: str) -> float:
        from orstack.architectures import linear_role

        role = linear_role(name)
        if role == "attention" and self.attn_sparsity is not None:
            return self.attn_sparsity
        if role == "mlp" and self.mlp_sparsity is not None:
            return self.mlp_sparsity
        return self.sparsity

    @property
    def pattern_text(self) -> str:
        return f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else "unstructured"


@dataclass
class PruneReport:
    layers: dict[str, float] = field(default_factory=dict)  # full weight name -> fraction of zeros
    zeros: int = 0
    total: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.total, 1)


def prune_matrix(
    weight: torch.Tensor, spec: PruneSpec, sparsity: float, stats=None  # noqa: ANN001 - layerwise.InputStats
) -> torch.Tensor:
    """The pruned copy of one weight matrix. Weights already exactly zero stay pruned."""
    import torch

    from orstack.prune.sparsegpt import sparsegpt_prune

    forced = weight == 0
    if spec.method == "sparsegpt":
        new, _ = sparsegpt_prune(weight, stats.hessian(), sparsity=sparsity, pattern=spec.pattern,
                                 blocksize=spec.blocksize, damp=spec.damp, forced=forced)
        return new
    scores = magnitude_scores(weight) if spec.method == "magnitude" else wanda_scores(weight, stats.norm)
    if spec.pattern is not None:
        scores = scores.masked_fill(forced, -torch.inf)
        keep = nm_mask(scores, *spec.pattern)
    else:
        keep = row_mask(scores, sparsity, forced)
    return torch.where(keep, weight, torch.zeros_like(weight))


def prune_model(model: nn.Module, calib_ids: torch.Tensor | None, spec: PruneSpec,
                on_unit: Callable[[nn.Module], None] | None = None,
                before_unit: Callable[[nn.Module], None] | None = None) -> PruneReport:
    """Prune every decoder-layer Linear of `model` in place; returns per-matrix sparsity.

    `calib_ids` [n, seqlen] feeds Wanda and SparseGPT; magnitude pruning needs none. A
    streamed model (orstack.layerwise.StreamedModel) has each layer read when its turn comes
    and dropped after `on_unit(layer)` (which writes it out) -- and lm_head too with
    `spec.lm_head`; a model in memory just calls `on_unit` after each. `before_unit(unit)`
    sees each unit in memory before it is pruned (a streamed stage's perplexity before).
    """
    import torch

    from orstack.architectures import layer_prefix
    from orstack.console import progress
    from orstack.layerwise import (
        capture_layer_inputs,
        decoder_layers,
        held,
        linear_modules,
        record_input_stats,
        run_layer,
    )

    layers = decoder_layers(model)
    if spec.pattern is not None:
        check_pattern_fits(layers, spec)
    needs_data = spec.method != "magnitude"
    if spec.lm_head:
        lm_head_of(model)  # refuse a tied lm_head before any work
    if needs_data and calib_ids is None:
        raise BadInput(f"--method {spec.method} needs calibration data (--calib)")
    inputs = capture_layer_inputs(model, calib_ids, spec.batch_size) if needs_data else None
    report = PruneReport()
    with progress() as bar:
        task = bar.add_task(f"{spec.method} {spec.pattern_text}", total=len(layers), unit="layers")
        for index, layer in enumerate(layers):
            with held(model, layer):
                if before_unit is not None:
                    before_unit(layer)
                modules = linear_modules(layer)
                prefix = layer_prefix(model, index)
                stats = None
                if needs_data:
                    with record_input_stats(modules, hessian=spec.method == "sparsegpt") as stats:
                        run_layer(layer, inputs)
                for name, module in modules.items():
                    full = f"{prefix}.{name}.weight"
                    with torch.no_grad():
                        new = prune_matrix(module.weight.data, spec, spec.sparsity_for(name),
                                           stats[name] if stats else None)
                        if spec.pattern is not None:
                            check_nm(new, *spec.pattern, name=full)
                        module.weight.data.copy_(new)
                    zeros = int((new == 0).sum())
                    report.layers[full] = zeros / new.numel()
                    report.zeros += zeros
                    report.total += new.numel()
                del stats
                if needs_data:
                    inputs = run_layer(layer, inputs)
                if on_unit is not None:
                    on_unit(layer)
            bar.advance(task)
    if spec.lm_head:
        head = lm_head_of(model)
        with held(model, head):
            if before_unit is not None:
                before_unit(head)
            _prune_lm_head(model, inputs, spec, report)
            if on_unit is not None:
                on_unit(head)
    return report


def lm_head_of(model: nn.Module) -> nn.Linear:
    """The output projection, if it may be pruned on its own (not tied to the embeddings)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or head.weight is embed.weight or (
            head.weight.numel() and head.weight.data_ptr() == embed.weight.data_ptr()):
        raise BadInput("--prune-lm-head: lm_head is tied to the input embeddings; pruning it would prune them too")
    return head


def _prune_lm_head(model: nn.Module, inputs, spec: PruneSpec, report: PruneReport) -> None:  # noqa: ANN001
    """lm_head sees the final norm of the last layer's output; prune it like any Linear."""
    import torch

    from orstack.architectures import final_norm
    from orstack.layerwise import record_input_stats

    head = lm_head_of(model)
    norm = final_norm(model) or (lambda h: h)
    stats = None
    if inputs is not None:
        with torch.no_grad(), record_input_stats({"lm_head": head}, hessian=spec.method == "sparsegpt") as stats:
            for hidden, _ in inputs.batches():
                head(norm(hidden))
    with torch.no_grad():
        new = prune_matrix(head.weight.data, spec, spec.sparsity, stats["lm_head"] if stats else None)
        if spec.pattern is not None:
            check_nm(new, *spec.pattern, name="lm_head.weight")
        head.weight.data.copy_(new)
    zeros = int((new == 0).sum())
    report.layers["lm_head.weight"] = zeros / new.numel()
    report.zeros += zeros
    report.total += new.numel()


def check_pattern_fits(layers: nn.ModuleList, spec: PruneSpec) -> None:
    """Every Linear's input width must be a multiple of the pattern's M."""
    from orstack.layerwise import linear_modules

    n, m = spec.pattern
    bad = sorted({name for name, mod in linear_modules(layers[0]).items() if mod.in_features % m})
    if bad:
        raise BadInput(f"--pattern {n}:{m}: input width of {', '.join(bad)} is not a multiple of {m}")


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of every decoder-layer Linear (and of an untied lm_head that
    holds zeros, i.e. was pruned), by parameter name."""
    from orstack.architectures import layer_prefix
    from orstack.layerwise import decoder_layers, linear_modules

    masks = {}
    for index, layer in enumerate(decoder_layers(model)):
        prefix = layer_prefix(model, index)
        for name, module in linear_modules(layer).items():
            masks[f"{prefix}.{name}.weight"] = module.weight.detach() != 0
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() != embed.weight.data_ptr() and bool((head.weight == 0).any()):
        masks["lm_head.weight"] = head.weight.detach() != 0  # pruned with --prune-lm-head
    return masks


def model_sparsity(model: nn.Module) -> PruneReport:
    """Per-matrix and overall sparsity of the decoder-layer Linears as they are now."""
    report = PruneReport()
    for name, keep in masks_of(model).items():
        zeros = int((~keep).sum())
        report.layers[name] = zeros / keep.numel()
        report.zeros += zeros
        report.total += keep.numel()
    return report
