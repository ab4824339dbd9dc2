"""`orstack gguf --dry-run`: the per-tensor plan from the config and the safetensors headers."""

from __future__ import annotations

import math
from pathlib import Path

from orstack.errors import BadInput
from orstack.gguf.export import plan_tensor
from orstack.gguf.stage import GgufConfig, check_config
from orstack.plan import Plan, TensorPlan, checkpoint_headers, meta_tensors


def plan(source: str | Path, config: GgufConfig) -> Plan:
    """What `orstack gguf` would write for every tensor of `source`: its GGUF name and GGML type
    (llama.cpp's *_M mix rules, and the fallback when a row does not fit a K-quant's 256-weight
    block), the real bits per weight of that type and the file's tensor bytes."""
    import gguf

    from orstack.architectures import weightless_model
    from orstack.gguf.arch import layout
    from orstack.io.checkpoint import load_config, resolve_checkpoint

    config = check_config(config)
    checkpoint = resolve_checkpoint(source)
    if not isinstance(checkpoint, Path) or not checkpoint.is_dir():
        raise BadInput(f"{source}: no such checkpoint directory")
    model_config = load_config(checkpoint)
    shape = layout(model_config, str(source))
    headers = checkpoint_headers(checkpoint)
    model = weightless_model(model_config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[shape.arch.member], shape.n_layers)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    result = Plan("gguf", str(source), bytes_in=sum(t.nbytes for t in headers.values()))
    unnamed = []
    for hf_name, dims in meta_tensors(model).items():
        if tied and hf_name == "lm_head.weight":
            continue
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            unnamed.append(hf_name)
            continue
        t = plan_tensor(gg_name, dims, config.type, shape.n_layers, tied)
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml_type]]
        n = math.prod(dims)
        nbytes = n // block * type_bytes
        result.tensors.append(TensorPlan(gg_name, dims, t.ggml_type, 8 * type_bytes / block, nbytes, t.note))
    fallbacks = [t for t in result.tensors if t.detail.startswith("row ")]
    if fallbacks:
        result.notes.append(f"{len(fallbacks)} tensors fall back from the requested K-quant (rows not a "
                            "multiple of 256), as llama.cpp's quantizer does")
    if unnamed:
        result.error = f"{source}: tensor '{unnamed[0]}' has no GGUF name for architecture {shape.arch.name}"
    return result
