"""The `awq` stage as one library call: calibrate, quantize, measure (no file I/O)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orstack import console
from orstack.awq.search import (
    AWQConfig,
    AWQResult,
    allocate_bits,
    group_sizes,
    quantize_awq,
    quantize_rtn,
    sensitivities,
    target_linears,
)

if TYPE_CHECKING:
    from torch import nn


def run_awq(model: nn.Module, tokenizer: Any, cfg: AWQConfig, calib_texts: list[str] | None,
            heldout_texts: list[str] | None = None, eval_length: int = 512) -> tuple[AWQResult, dict[str, Any]]:
    """Quantize `model` in place (its Linear weights become the dequantized values) and return
    the codes plus metrics (held-out perplexity before/after when `heldout_texts` is given)."""
    import torch

    from orstack.io.text import check_seqlen, token_windows

    sizes = group_sizes(model, cfg)
    metrics: dict[str, Any] = {}
    if heldout_texts:
        metrics["ppl_before"] = _ppl(model, tokenizer, heldout_texts, eval_length)
    sparse_before = _zero_masks(model)
    if cfg.rtn:
        result = quantize_rtn(model, cfg, sizes)
    else:
        check_seqlen(model, cfg.seqlen)
        ids = token_windows(tokenizer, calib_texts, cfg.nsamples, cfg.seqlen, cfg.seed)
        bits = None
        if cfg.mixed_precision:
            widths = tuple(sorted({max(cfg.bits - 1, 2), cfg.bits, min(cfg.bits + 1, 8)}))
            with console.progress() as bar:
                task = bar.add_task("sensitivity", total=len(model.model.layers), unit="layers")
                sens = sensitivities(model, ids, cfg, sizes, widths, lambda i, n: bar.update(task, completed=i))
            params = {name: m.weight.numel() for name, m in target_linears(model).items()}
            bits = allocate_bits(sens, params, cfg.bits, cfg.promote_fraction)
        with console.progress() as bar:
            task = bar.add_task("awq", total=len(model.model.layers), unit="layers")
            with torch.no_grad():
                result = quantize_awq(model, ids, cfg, sizes, bits, lambda i, n: bar.update(task, completed=i))
    metrics.update(result.summary())
    if cfg.mixed_precision:
        metrics["bits"] = {name: b for name, b in result.bits.items() if b != cfg.bits}
    if cfg.group_size == "auto":
        metrics["group_size_per_layer"] = {name.split(".", 3)[-1]: g for name, g in result.group_sizes.items()
                                           if name.startswith(_first_layer_prefix(result))}
    linears = target_linears(model)
    lost = [name for name, mask in sparse_before.items() if bool(linears[name].weight[mask].any())]
    if lost:
        raise RuntimeError(f"quantization un-zeroed pruned weights in {lost[:3]}")
    metrics["zeros_kept"] = sum(int(mask.sum()) for mask in sparse_before.values())
    if heldout_texts:
        metrics["ppl_after"] = _ppl(model, tokenizer, heldout_texts, eval_length)
    return result, metrics


def _first_layer_prefix(result: AWQResult) -> str:
    first = next(iter(result.group_sizes))
    return first.rsplit(".", 2)[0] + "."


def _zero_masks(model: nn.Module) -> dict[str, Any]:
    """Where each target Linear holds exact zeros (a pruned model must keep them zero)."""
    masks = {name: m.weight == 0 for name, m in target_linears(model).items()}
    return {name: mask for name, mask in masks.items() if bool(mask.any())}


def _ppl(model: nn.Module, tokenizer: Any, texts: list[str], eval_length: int) -> float:
    from orstack.backends.perplexity import default_max_length, perplexity

    length = min(eval_length, default_max_length(model))
    return round(perplexity(model, tokenizer, texts, max_length=length).ppl, 4)
