"""A Llama-family transformers model as a GGUF file, written with the `gguf` package.

Llama and Mistral are written as llama.cpp's "llama" architecture, whose rotary
embedding pairs dimension i with i+1 within each head, while transformers pairs i with
i + head_dim/2: q and k projections are permuted so the two agree. Qwen2 is written as
"qwen2" (NEOX-style rotary, the same pairing as transformers: no permutation), with its
q/k/v biases.

Tensor types: `--type` names one type for every 2-D weight (like llama-quantize
--pure), except q4_k_m and q5_k_m, which follow llama.cpp's Q4_K_M / Q5_K_M mixes. Norms and
biases stay F32.
A tensor whose row length does not fit the type's block falls back as llama.cpp does
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16), and the plan says so per tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from orstack.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
# llama.cpp's *_M mixes: Q6_K for the output and for attn_v / ffn_down in the layers _use_more_bits picks.
MIXES = ("q4_k_m", "q5_k_m")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# user type -> (default ggml type of 2-D weights, LlamaFileType name)
TYPE_INFO = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_k": ("Q4_K", "MOSTLY_Q4_K_S"), "q5_k": ("Q5_K", "MOSTLY_Q5_K_S"), "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"), "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
}


@dataclass
class TensorPlan:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # torch order (rows, cols)
    ggml_type: str
    note: str = ""  # why it differs from the requested type
    nbytes: int = 0


@dataclass
class ExportResult:
    path: Path
    arch: str
    file_type: str
    tensors: list[TensorPlan]
    size_bytes: int
    seconds: float
    vocab_notes: list[str] = field(default_factory=list)


def check_type(qtype: str) -> str:
    q = qtype.lower()
    if q not in TYPES:
        raise BadInput(f"--type: unknown type '{qtype}' (choose from {', '.join(TYPES)})")
    return q


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp's layer choice for the extra-precision tensors of its *_M mixes.
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _block_size(ggml_type: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0]


def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith(".weight") and "_norm." not in name


def plan_tensor(name: str, shape: tuple[int, ...], qtype: str, n_layers: int, tied: bool) -> TensorPlan:
    """The GGML type of one tensor under `qtype` (llama.cpp's rules for the *_M mixes), with fallbacks."""
    if not _is_quantizable(name, shape):
        return TensorPlan(name, shape, "F32")
    wanted, _ = TYPE_INFO[qtype]
    note = ""
    if qtype in MIXES:
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            wanted, note = ("Q6_K", "output: Q6_K") if shape[-1] % 256 == 0 else ("Q8_0", "output: Q8_0")
        elif (".attn_v." in name or ".ffn_down." in name) and _use_more_bits(layer, n_layers):
            wanted, note = "Q6_K", f"more bits ({qtype.upper()} rule)"
    if shape[-1] % _block_size(wanted):
        original = wanted
        wanted = FALLBACK.get(wanted, "F16")
        if shape[-1] % _block_size(wanted):
            wanted = "F16"
        note = f"row {shape[-1]} not a multiple of {_block_size(original)}: {original} -> {wanted}"
    return TensorPlan(name, shape, wanted, note)


def quantize(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 [rows, cols] -> the bytes (or float array) GGUFWriter stores for `ggml_type`."""
    import gguf
    import numpy as np

    from orstack.gguf import kquants

    if ggml_type == "F32":
        return data.astype(np.float32)
    if ggml_type == "F16":
        return data.astype(np.float16)
    if ggml_type in kquants.QUANTIZERS:
        return kquants.QUANTIZERS[ggml_type](data)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[ggml_type])


def _permute_rotary(w, n_heads: int):
    """transformers' half-split rotary layout -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise BadInput(f"rope scaling '{kind}' is not supported by orstack gguf yet")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def hf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(HF name, float32 numpy array) for every tensor to export; tied lm_head left out."""
    import torch

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = []
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        out.append((name, tensor.detach().to(torch.float32).cpu().numpy()))
    return out


def export_gguf(model, tokenizer, out: Path, qtype: str, *, name: str = "model", progress: bool = True,
                q4_1_blocks: dict[str, np.ndarray] | None = None, metadata: dict[str, str] | None = None,
                ) -> ExportResult:
    """Write `model` (a loaded transformers Llama-family model) to `out` as GGUF of `qtype`.

    `q4_1_blocks` (HF weight name -> Q4_1 bytes, from orstack.gguf.awq) replaces quantization
    of those weights when the plan stores them as Q4_1. `metadata` adds string keys after all
    the others (the orstack manifest)."""
    import gguf

    from orstack.console import track
    from orstack.gguf.vocab import build_vocab

    start = time.perf_counter()
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise BadInput(f"{name}: unsupported architecture '{model_type}' (supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[model_type]
    qtype = check_type(qtype)
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    n_kv = _config_value(config, "num_key_value_heads", default=n_heads)
    head_dim = _config_value(config, "head_dim", default=config.hidden_size // n_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_vocab = model.get_input_embeddings().weight.shape[0]
    vocab = build_vocab(tokenizer, n_vocab, where=name)
    theta = _rope_theta(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_layers)

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_context_length(_config_value(config, "max_position_embeddings", default=2048))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    file_type = TYPE_INFO[qtype][1]
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    if qtype not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)

    plans = []
    tensors = hf_tensors(model)
    for hf_name, data in track(tensors, "quantizing", unit="tensors") if progress else tensors:
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise BadInput(f"{name}: tensor '{hf_name}' has no GGUF name for architecture {arch}")
        if arch == "llama" and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
            data = _permute_rotary(data, n_heads if ".q_proj." in hf_name else n_kv)
        plan = plan_tensor(gg_name, tuple(data.shape), qtype, n_layers, tied)
        if q4_1_blocks and hf_name in q4_1_blocks and plan.ggml_type == "Q4_1":
            stored = q4_1_blocks[hf_name]
            if arch == "llama" and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
                stored = _permute_rotary(stored, n_heads if ".q_proj." in hf_name else n_kv)  # rows = outputs
            plan.note = "AWQ scales/zero points mapped onto Q4_1"
        else:
            stored = quantize(data, plan.ggml_type)
        raw = None if plan.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[plan.ggml_type]
        writer.add_tensor(gg_name, stored, raw_dtype=raw)
        plan.nbytes = stored.nbytes
        plans.append(plan)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ExportResult(out, arch, file_type, plans, out.stat().st_size, time.perf_counter() - start, vocab.notes)
