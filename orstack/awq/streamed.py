"""`awq` on a model read layer by layer (orstack.layerwise.StreamedModel).

`quantize_in_place` runs unchanged -- the same calibration windows, statistics, scale and clip
searches, in float32 -- but each decoder layer is read from the checkpoint when its turn
comes, and after it is quantized its Linears are packed (compressed-tensors' own per-module
compressor) and written to the output's shards with its folded norms, then dropped with its
codes. Embeddings and lm_head are copied as stored. Perplexity after runs over the shards
just written, read back through their decompressor, streamed too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from orstack.awq.search import AWQConfig, Quantization, Quantized


@dataclass
class StreamedQuantization:
    model: nn.Module  # the quantized model, streamed from the staging directory
    quantization: Quantization
    metrics: dict[str, Any]
    write_weights: Callable[[Path], None]  # moves the shards into the committed output


def quantize_streamed(model: nn.Module, tokenizer: Any, cfg: AWQConfig, staging: Path,
                      calib_texts: list[str] | None, heldout_texts: list[str] | None = None,
                      ) -> StreamedQuantization:
    import torch
    from torch import nn

    from orstack.architectures import layer_prefix
    from orstack.awq.packed import compress_module, input_masks, packed_writer, write_packed_config
    from orstack.awq.stage import _ppl, quantize_in_place
    from orstack.io.safetensors_file import ShardedWriter
    from orstack.layerwise import load_streamed, stream_of, write_stored

    stream = stream_of(model)
    masks = input_masks(stream.reader.directory)  # a sparse input is written in the sparse 4-bit layout
    writer = packed_writer(staging, sparse=bool(masks)) if not cfg.fake_quant else ShardedWriter(
        staging, metadata={"format": "pt"})
    zeros = {"kept": 0}
    lost: list[str] = []

    def on_layer(i: int, layer: nn.Module, layer_q: dict[str, Quantized]) -> None:
        prefix = layer_prefix(model, i)
        for name in stream.names(layer):
            module_name, _, attr = name.rpartition(".")
            local = module_name[len(prefix) + 1:]
            value = stream.params[name][0].data
            if attr != "weight" or local not in layer_q:
                writer.add(name, value)  # norms (folded scales) and biases, in float32 as computed
                continue
            q = layer_q[local]
            pruned = stream.tensor(name) == 0  # a pruned model's zeros must stay zero
            if bool(value[pruned].any()):
                lost.append(module_name)
            zeros["kept"] += int(pruned.sum())
            if cfg.fake_quant:
                writer.add(name, value)
            else:
                for key, tensor in compress_module(q, value.dtype, masks.get(name)).items():
                    writer.add(f"{module_name}.{key}", tensor)
            _forget_codes(q)

    quantization, metrics = quantize_in_place(model, tokenizer, cfg, calib_texts, heldout_texts=None,
                                              on_layer=on_layer)
    if lost:
        raise RuntimeError(f"quantization un-zeroed pruned weights in {lost[:3]}")
    metrics["zeros_kept"] = zeros["kept"]
    write_stored(stream, writer)
    writer.close()
    model.config.save_pretrained(staging)
    ignore = sorted(name for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and name not in quantization.quantized)
    if not cfg.fake_quant:
        write_packed_config(quantization.quantized, staging, ignore)
    quantized, _ = load_streamed(staging, device=stream.device, dtype="float32", with_tokenizer=False)
    if heldout_texts:
        metrics["ppl_before"] = _ppl(model, tokenizer, heldout_texts, cfg.eval_length)
        metrics["ppl_after"] = _ppl(quantized, tokenizer, heldout_texts, cfg.eval_length)
    metrics["streamed"] = True

    def write_weights(tmp: Path) -> None:
        for f in sorted(staging.iterdir()):
            if f.name.endswith((".safetensors", ".safetensors.index.json")):
                f.replace(tmp / f.name)
        if not cfg.fake_quant:
            write_packed_config(quantization.quantized, tmp, ignore)

    del torch
    return StreamedQuantization(quantized, quantization, metrics, write_weights)


def _forget_codes(q: Quantized) -> None:
    """Drop a written Linear's codes, scales and zero points (about a byte per weight: 8 GB for an
    8B model) but keep their shapes: the run's summary counts codes, nothing reads them again."""
    import torch

    q.codes = torch.zeros((), dtype=q.codes.dtype).expand(q.codes.shape)
    q.scale = torch.zeros((), dtype=q.scale.dtype).expand(q.scale.shape)
    if q.zero_point is not None:
        q.zero_point = torch.zeros((), dtype=q.zero_point.dtype).expand(q.zero_point.shape)
