"""The `awq` stage as one library call: check, load, calibrate, quantize, measure, save.

`run(source, output, AWQConfig(...), runtime)` writes the quantized checkpoint (packed, or
dequantized with `fake_quant`) with its manifest and returns an AWQResult for the command to
print; `quantize_in_place` is the work on a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack import console
from orstack.awq.search import (
    DEFAULT_SEQLEN,
    UNSCALED_REASON,
    AWQConfig,
    LayerReport,
    Quantization,
    allocate_bits,
    check_config,
    group_sizes,
    quantize_awq,
    quantize_rtn,
    sensitivities,
    target_linears,
)
from orstack.errors import BadInput
from orstack.layerwise import cleans_staging

if TYPE_CHECKING:
    from torch import nn

    from orstack.runtime import Runtime

PACKED_FORMAT = "compressed-tensors-pack-quantized"  # the manifest's weights_format of a packed output


@dataclass
class AWQResult:
    """What `orstack awq` reports: the output, the manifest's metrics, the per-layer AWQ report
    (empty for --rtn) and the bytes of the weight files written."""

    output: Path
    metrics: dict[str, Any]
    layers: list[LayerReport]
    weights_bytes: int


@cleans_staging
def run(source: str | Path, output: str | Path, config: AWQConfig, runtime: Runtime) -> AWQResult:
    """Quantize the checkpoint `source` as `config` says and write it to the directory `output`.

    Everything is checked before a weight is loaded: the options, the checkpoint (a decoder made
    of Linears, checked on its config: orstack.architectures), the text files, the output path
    and the device.
    """
    from orstack.architectures import check_config as check_architecture
    from orstack.architectures import weightless_model
    from orstack.awq.packed import input_masks, packed_format, write_packed
    from orstack.awq.streamed import quantize_streamed
    from orstack.gates import decide, load_eval_tasks, measure_tasks, retention_checks
    from orstack.io.checkpoint import can_stream, load_config, load_model, resolve_checkpoint, save_checkpoint
    from orstack.io.output import check_output
    from orstack.io.text import check_text_files, read_texts
    from orstack.layerwise import Staging, load_streamed
    from orstack.runtime import seed_everything

    check_config(config)
    checkpoint = resolve_checkpoint(source)
    if not isinstance(checkpoint, Path):
        raise BadInput(f"{source}: no such checkpoint directory")
    if config.calib:
        check_text_files(config.calib, "--calib")
    if config.heldout:
        check_text_files(config.heldout, "--heldout")
    eval_tasks = load_eval_tasks(config.eval_tasks) if config.eval_tasks else None
    output = Path(output)
    check_output(output, kind="dir", option="-o", inputs=[checkpoint])
    model_config = load_config(checkpoint)
    check_architecture(model_config, str(checkpoint))
    if config.group_size != "auto":  # a size that does not divide a width, named before loading
        group_sizes(weightless_model(model_config), config)
    device = runtime.torch_device()
    masks = input_masks(checkpoint)  # a sparse (pruned) input: its masks, for the sparse 4-bit layout (packed.py)

    calib_texts = list(read_texts(config.calib)) if config.calib else None
    heldout_texts = list(read_texts(config.heldout)) if config.heldout else None
    # float32 throughout: the scales are stored in it, so packed and fake-quant weights agree bit for bit.
    # safetensors weights are read layer by layer (the same output; orstack/awq/streamed.py)
    staging = Staging(output) if runtime.stream and can_stream(checkpoint) else None
    if staging is not None:
        model, tokenizer = load_streamed(checkpoint, device=device, dtype="float32")
    else:
        model, tokenizer = load_model(checkpoint, device=device, dtype="float32", trust_pickle=runtime.trust_pickle)
    seed_everything(config.seed)
    parent_score = measure_tasks(model, tokenizer, eval_tasks, name="parent") if eval_tasks else None
    if staging is not None:
        streamed = quantize_streamed(model, tokenizer, config, staging.path, calib_texts, heldout_texts)
        model, quantization, metrics = streamed.model, streamed.quantization, streamed.metrics
    else:
        quantization, metrics = quantize_in_place(model, tokenizer, config, calib_texts, heldout_texts)
    child_score = measure_tasks(model, tokenizer, eval_tasks, name="awq") if eval_tasks else None
    if eval_tasks:
        metrics["eval_before"], metrics["eval_after"] = parent_score.as_dict(), child_score.as_dict()
    verdict = decide("awq", retention_checks(
        min_retention=config.min_retention, max_ppl_rise=config.max_ppl_rise,
        ppl=(metrics["ppl_before"], metrics["ppl_after"]) if heldout_texts else None,
        tasks=(parent_score, child_score) if eval_tasks else None, eval_on=config.eval_tasks or ""), config.force)
    write_weights, extra = None, None
    if staging is not None:
        write_weights = streamed.write_weights
        extra = None if config.fake_quant else {"weights_format": packed_format(masks)}
    elif not config.fake_quant:
        def write_weights(tmp: Path) -> None:
            write_packed(model, quantization.quantized, tmp, masks)

        extra = {"weights_format": packed_format(masks)}
    extra = {**(extra or {}), "gate": verdict.record()}
    save_checkpoint(model, tokenizer, output, stage="awq", args=config, parent=checkpoint, metrics=metrics,
                    extra=extra, write_weights=write_weights)
    if staging is not None:
        staging.cleanup()
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    return AWQResult(output, metrics, quantization.layers, size)


def quantize_in_place(model: nn.Module, tokenizer: Any, cfg: AWQConfig, calib_texts: list[str] | None,
                      heldout_texts: list[str] | None = None, on_layer: Any = None,
                      ) -> tuple[Quantization, dict[str, Any]]:
    """Quantize `model` in place (its Linear weights become the dequantized values) and return
    the codes plus metrics (held-out perplexity before/after when `heldout_texts` is given).
    With `on_layer` (a streamed model: orstack.awq.streamed) each layer is handed to it once
    quantized, and the checks on the whole model are left to the caller."""
    import torch

    from orstack.io.text import check_seqlen, token_windows
    from orstack.layerwise import decoder_layers

    sizes = group_sizes(model, cfg)
    metrics: dict[str, Any] = {}
    if heldout_texts:
        metrics["ppl_before"] = _ppl(model, tokenizer, heldout_texts, cfg.eval_length)
    sparse_before = _zero_masks(model) if on_layer is None else {}
    if cfg.rtn:
        quantization = quantize_rtn(model, cfg, sizes, on_layer)
    else:
        seqlen = cfg.seqlen
        if seqlen is None:  # as prune does: the default never exceeds a small model's context
            seqlen = min(DEFAULT_SEQLEN, getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQLEN)
        check_seqlen(model, seqlen)
        metrics["seqlen"] = seqlen
        ids = token_windows(tokenizer, calib_texts, cfg.nsamples, seqlen, cfg.seed)
        bits = None
        if cfg.mixed_precision:
            widths = tuple(sorted({max(cfg.bits - 1, 2), cfg.bits, min(cfg.bits + 1, 8)}))
            with console.progress() as bar:
                task = bar.add_task("sensitivity", total=len(decoder_layers(model)), unit="layers")
                sens = sensitivities(model, ids, cfg, sizes, widths, lambda i, n: bar.update(task, completed=i))
            params = {name: m.in_features * m.out_features for name, m in target_linears(model).items()}
            bits = allocate_bits(sens, params, cfg.bits, cfg.promote_fraction)
        with console.progress() as bar:
            task = bar.add_task("awq", total=len(decoder_layers(model)), unit="layers")
            with torch.no_grad():
                quantization = quantize_awq(model, ids, cfg, sizes, bits, lambda i, n: bar.update(task, completed=i),
                                            on_layer=on_layer)
        unscaled = quantization.unscaled_groups()
        if unscaled:
            console.info(f"awq: nothing to fold a scale into for {'; '.join(unscaled)} "
                         f"({getattr(model.config, 'model_type', 'model')}): {UNSCALED_REASON}")
    metrics.update(quantization.summary())
    if cfg.mixed_precision:
        metrics["bits"] = {name: b for name, b in quantization.bits.items() if b != cfg.bits}
    if cfg.group_size == "auto":
        metrics["group_size_per_layer"] = {name.split(".", 3)[-1]: g for name, g in quantization.group_sizes.items()
                                           if name.startswith(_first_layer_prefix(quantization))}
    if on_layer is not None:
        return quantization, metrics
    linears = target_linears(model)
    lost = [name for name, mask in sparse_before.items() if bool(linears[name].weight[mask].any())]
    if lost:
        raise RuntimeError(f"quantization un-zeroed pruned weights in {lost[:3]}")
    metrics["zeros_kept"] = sum(int(mask.sum()) for mask in sparse_before.values())
    if heldout_texts:
        metrics["ppl_after"] = _ppl(model, tokenizer, heldout_texts, cfg.eval_length)
    return quantization, metrics


def _first_layer_prefix(result: Quantization) -> str:
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
