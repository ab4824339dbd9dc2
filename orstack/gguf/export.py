"""A transformers decoder as a GGUF file, written with the `gguf` package.

orstack/gguf/arch.py decides what the model becomes in llama.cpp (architecture name, metadata
keys, which norms are stored as w + 1, whether q/k rows are permuted for llama.cpp's
interleaved rotary); this module writes it: the generic keys, the family's keys, the
vocabulary, and every tensor under the arch's GGUF name in the requested type. Phi-3's fused
qkv_proj and gate_up_proj are written fused (llama.cpp's attn_qkv and a 2I-row ffn_up).

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

    from orstack.gguf.awq import AwqWeight
    from orstack.gguf.imatrix import Importance

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
# llama.cpp's *_M mixes: Q6_K for the output and for attn_v / ffn_down in the layers _use_more_bits picks.
MIXES = ("q4_k_m", "q5_k_m")
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


def quantize(data: np.ndarray, ggml_type: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, cols] -> the bytes (or float array) GGUFWriter stores for `ggml_type`;
    `importance` [cols] (orstack/gguf/imatrix.py) weights the scale searches, as llama.cpp's imatrix."""
    import gguf
    import numpy as np

    from orstack.gguf import kquants, legacy

    if ggml_type == "F32":
        return data.astype(np.float32)
    if ggml_type == "F16":
        return data.astype(np.float16)
    if ggml_type in kquants.QUANTIZERS:
        return kquants.QUANTIZERS[ggml_type](data, importance)
    if importance is not None and ggml_type in legacy.WEIGHTED:
        return legacy.quantize_weighted(data, ggml_type, importance)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[ggml_type])


def importance_by_gguf_name(model, importance: Importance) -> dict[str, np.ndarray]:
    """The importance under the GGUF tensor names llama.cpp looks it up by (a tied model's
    output matrix is token_embd.weight), for llama.cpp's own quantizer."""
    import gguf

    from orstack.gguf.arch import layout

    shape = layout(model.config, "model")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[shape.arch.member], shape.n_layers)
    out = {}
    for hf_name, _ in tensor_shapes(model):
        values = importance.for_weight(hf_name)
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if values is not None and gg_name is not None:
            out[gg_name] = values
    return out


def _permute_rotary(w, n_heads: int):
    """transformers' half-split rotary layout -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(HF name, float32 numpy array) for every tensor to export; tied lm_head left out. All at
    once: the export itself reads them one at a time (`tensor_shapes`, `hf_tensor`)."""
    state = None if _stream(model) is not None else model.state_dict()
    return [(name, hf_tensor(model, name, state)) for name, _ in tensor_shapes(model)]


def _stream(model):  # noqa: ANN202
    from orstack.layerwise import stream_of

    return stream_of(model)


def tensor_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor to export, in the model's order; tied lm_head left out."""
    from orstack.layerwise import stream_of

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    stream = stream_of(model)
    shapes = stream.shapes if stream is not None else {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return [(name, shape) for name, shape in shapes.items()
            if not (name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"))]


def hf_tensor(model, name: str, state: dict | None = None) -> np.ndarray:
    """One tensor as float32 numpy: read from the checkpoint for a streamed model (as stored,
    then upcast -- the same numbers a float32 load gives), else from `state` (the state dict)."""
    import torch

    from orstack.layerwise import stream_of

    stream = stream_of(model)
    if stream is not None and name in stream.params:
        tensor = stream.tensor(name)
    else:
        tensor = (state if state is not None else model.state_dict())[name]
    return tensor.detach().to(torch.float32).cpu().numpy()


def _nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    import math

    import gguf

    if ggml_type == "F32":
        return 4 * math.prod(shape)
    if ggml_type == "F16":
        return 2 * math.prod(shape)
    return math.prod(gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[ggml_type]))


PHI3_NAMES = ("phi3", "phi-3")
PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def safe_name(name: str, tokens: list[str]) -> tuple[str, str]:
    """The general.name to write, and a note when it differs from `name`.

    llama.cpp's vocabulary loader treats a model whose name contains "phi3"/"phi-3" as Phi-3:
    it looks up </s> <unk> <s> <|endoftext|> (failing to load when one is missing) and marks
    every special token as eating the whitespace after it. A name that would trigger that for
    a vocabulary without those tokens is replaced."""
    if not any(p in name.lower() for p in PHI3_NAMES):
        return name, ""
    missing = [t for t in PHI3_TOKENS if t not in set(tokens)]
    if not missing:
        return name, ""
    return "model", (f"general.name 'model' instead of '{name}': llama.cpp treats names containing "
                     f"'phi3' as Phi-3 and needs {' '.join(missing)}, which this vocabulary lacks")


def export_gguf(model, tokenizer, out: Path, qtype: str, *, name: str = "model", progress: bool = True,
                awq: dict[str, AwqWeight] | None = None, awq_mode: str = "best",
                metadata: dict[str, str] | None = None, importance: Importance | None = None) -> ExportResult:
    """Write `model` (a loaded transformers decoder of a family orstack.gguf.arch supports) to `out` as GGUF of `qtype`.

    `awq` (HF weight name -> packed AWQ weight, orstack.gguf.awq.read_awq) carries AWQ's groups
    into the blocks of every weight whose planned type they map onto (`awq_mode`: see
    orstack/gguf/awq.py); the rest are quantized from their float values. `metadata` adds string keys after all
    the others (the orstack manifest). `importance` (orstack.gguf.imatrix) weights the quantization
    of every weight it covers; its calibration file is named under llama.cpp's quantize.imatrix.* keys."""
    import gguf
    import numpy as np

    from orstack.console import track
    from orstack.gguf import awq as awq_blocks
    from orstack.gguf.arch import layout, probe_norms
    from orstack.gguf.vocab import build_vocab
    from orstack.layerwise import param_shape, stream_of

    start = time.perf_counter()
    config = model.config
    shape = layout(config, name)
    probe_norms(model, shape)
    arch = shape.arch.name
    qtype = check_type(qtype)
    n_layers, n_heads, n_kv, head_dim = shape.n_layers, shape.n_heads, shape.n_kv, shape.head_dim
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_vocab = param_shape(model, model.get_input_embeddings().weight)[0]
    vocab = build_vocab(tokenizer, n_vocab, where=name)
    name, name_note = safe_name(name, vocab.tokens)
    if name_note:
        vocab.notes.append(name_note)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[shape.arch.member], n_layers)

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_context_length(getattr(config, "max_position_embeddings", None) or 2048)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(shape.rope_dims)
    if head_dim != config.hidden_size // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    for method, value in shape.keys:
        getattr(writer, method)(value)
    file_type = TYPE_INFO[qtype][1]
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    if qtype not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)
    if importance is not None:
        writer.add_string("quantize.imatrix.file", importance.source)
        writer.add_string("quantize.imatrix.dataset", importance.source)
        writer.add_uint32("quantize.imatrix.entries_count", len(importance.values))
        writer.add_uint32("quantize.imatrix.chunks_count", importance.n_windows)
        writer.add_string("orstack.imatrix.sha256", importance.digest())  # of the importance values used
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)

    # Two passes so no more than one tensor is in memory: the plan (names, shapes, types, sizes)
    # goes into the header first, then each tensor is read, converted and written in turn.
    plans, jobs = [], []
    for hf_name, hf_shape in tensor_shapes(model):
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise BadInput(f"{name}: tensor '{hf_name}' has no GGUF name for architecture {arch}")
        plan = plan_tensor(gg_name, tuple(hf_shape), qtype, n_layers, tied)
        packed = (awq or {}).get(hf_name)
        if packed is not None and plan.ggml_type not in ("F32", "F16") \
                and awq_blocks.mapping(packed, plan.ggml_type) is None:
            plan.note = "; ".join(filter(None, [plan.note, f"AWQ groups of {packed.group} do not map onto "
                                                f"{plan.ggml_type}: requantized"]))
            packed = None
        plan.nbytes = _nbytes(plan.shape, plan.ggml_type)
        raw = None if plan.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[plan.ggml_type]
        writer.add_tensor_info(gg_name, list(plan.shape), np.float16 if plan.ggml_type == "F16" else np.float32,
                               plan.nbytes, raw_dtype=raw)
        plans.append(plan)
        jobs.append((hf_name, plan, packed if plan.ggml_type not in ("F32", "F16") else None))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    state = None if stream_of(model) is not None else model.state_dict()
    for hf_name, plan, packed in track(jobs, "quantizing", unit="tensors") if progress else jobs:
        rotary = shape.permute and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name)
        heads = n_heads if ".q_proj." in hf_name else n_kv
        data = hf_tensor(model, hf_name, state)
        weights = importance.for_weight(hf_name) if importance else None
        carried = None if packed is None else awq_blocks.carry(packed, plan.ggml_type, data, weights, awq_mode)
        if carried is not None:
            # blocks never straddle rows, so permuting the byte rows permutes the weights' rows
            stored, plan.note = carried
            if rotary:
                stored = _permute_rotary(stored, heads)
        else:
            if rotary:
                data = _permute_rotary(data, heads)
            if hf_name in shape.offset_norms:
                data = data + 1.0  # llama.cpp's RMS norm multiplies by the stored weight alone
            stored = quantize(data, plan.ggml_type, weights)
        del data
        writer.write_tensor_data(stored)
        del stored
    writer.close()
    return ExportResult(out, arch, file_type, plans, out.stat().st_size, time.perf_counter() - start, vocab.notes)
