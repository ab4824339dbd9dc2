"""Packed checkpoints in compressed-tensors' "pack-quantized" format: writer and loader.

Layout (per quantized Linear `<name>`, safetensors; compressed-tensors 0.20):
  <name>.weight_packed      int32 [out, ceil(in·bits/32)]  codes + 2^(bits-1) (unsigned), packed
                            densely along the input dim: element i of a row occupies bits
                            i·bits … i·bits+bits-1 counting from bit 0 of word 0
                            (4-bit: 8 codes per int32, lowest nibble first)
  <name>.weight_scale       [out, in/group] in the model's dtype
  <name>.weight_zero_point  int32 [ceil(out·bits/32), in/group] (asymmetric only): the zero points
                            (+2^(bits-1)) packed the same way along the *output* dim
  <name>.weight_shape       int64 [2] = (out, in)
  weight = (code - zero_point) · scale per group of `group` consecutive input weights.
config.json's `quantization_config` (quant_method "compressed-tensors", format
"pack-quantized") holds one config group per bit width, targeting the modules by name.
Embeddings, norms and lm_head stay in the model's dtype. Plain transformers loads it when
every config group is symmetric (docs/awq.md says which ones).

Sparse 4-bit ("orstack-sparse-pack-quantized"): awq on a checkpoint that stores pruned
weights sparsely (orstack's sparse prune format) keeps each pruned Linear's mask and packs only
the codes of the kept weights. Files `orstack-sparse-quantized.safetensors` (sharded:
`orstack-sparse-quantized-0000i-of-0000n.safetensors` + its `.index.json`), config.json as
above; a module whose input was not sparse (or where sparse is not smaller) is stored as in
pack-quantized, else by one of:
  2:4 (every group of 4 consecutive input weights keeps at most 2; the layout of
  compressed-tensors' sparse-24 and marlin-24 formats: values + 2-bit indices):
    <name>.weight_packed  int32 [out, ceil(in/2·bits/32)]  the 2 kept codes of each group of 4,
                          in ascending position, packed as pack-quantized packs a row
    <name>.weight_meta    uint8 [out, in/8]  each kept code's position in its group (0-3),
                          2 bits, 4 per byte, first from the least significant bits
  bitmask (any other mask):
    <name>.weight_bitmask uint8 [out, ceil(in/8)]  bit j of row r is byte j // 8, bit j % 8 from
                          the least significant bit (prune's bitmask); 1 = kept
    <name>.weight_packed  int32 [1, ceil(nnz·bits/32)]  the kept codes in row-major order
  and weight_scale, weight_zero_point, weight_shape exactly as pack-quantized stores them.
A weight outside the mask has the zero code of its group (pruned weights dequantize to exactly
0), so decoding scatters the kept codes into a matrix of zero codes and dequantizes it with
compressed-tensors' own decompressor: bit for bit the dense pack-quantized weights. transformers
looks for model.safetensors and so refuses the directory ("no file named model.safetensors")
instead of loading random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from orstack.awq.grid import Quantized

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "pack-quantized"
WEIGHTS_FORMAT = "compressed-tensors-pack-quantized"  # the manifest's weights_format of a packed output
SPARSE_FORMAT = "orstack-sparse-pack-quantized"  # ... and of one in the sparse 4-bit layout
SPARSE_PREFIX = "orstack-sparse-quantized"


def quantization_config(quantized: dict[str, Quantized]):  # -> compressed_tensors QuantizationConfig
    """One config group per (bits, group size, symmetric), its targets the module names."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_spec: dict = {}
    for name, q in quantized.items():
        by_spec.setdefault(q.spec, []).append(name)
    groups = {}
    for i, (spec, names) in enumerate(sorted(by_spec.items(), key=lambda kv: (kv[0].bits, kv[0].group_size))):
        args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group",
                                group_size=spec.group_size)
        groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args)
    return QuantizationConfig(config_groups=groups, quantization_status="frozen", format=FORMAT)


def write_packed(model: nn.Module, quantized: dict[str, Quantized], out_dir: Path, masks=None) -> None:  # noqa: ANN001
    """Save `model` with the Linears named in `quantized` stored packed. The model's Linear
    weights must already be the dequantized values (they are re-coded by compressed-tensors
    and must land on the same codes). The model is compressed in place: do not use it after.
    With `masks` (`input_masks` of a sparse input) the sparse 4-bit layout is written instead."""
    if masks:
        write_sparse_packed(model, quantized, out_dir, masks)
        return
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    apply_quantization_config(model, quantization_config(quantized), show_progress=False)
    for name, q in quantized.items():
        module = model.get_submodule(name)
        module.weight.data.copy_(q.dequantize(module.weight.dtype))
        module.weight_scale.data = q.scale.to(module.weight.dtype).clone()
        if q.zero_point is not None:
            module.weight_zero_point.data = q.zero_point.clone()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    _quietly(compressor.compress_model, model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    _let_transformers_dequantize(out_dir)


def _quietly(fn, *args):
    """compressed-tensors draws tqdm bars on stderr; orstack shows its own progress."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def is_packed(path: Path) -> bool:
    """A checkpoint directory whose config declares compressed-tensors pack-quantized weights
    (stored as pack-quantized, not in the sparse layout)."""
    return _declares_packed(path) and not _has_sparse_files(path)


def is_sparse_packed(path: Path) -> bool:
    """A pack-quantized config whose weights are in the sparse 4-bit layout's files."""
    return _declares_packed(path) and _has_sparse_files(path)


def _has_sparse_files(path: Path) -> bool:
    from orstack.io.safetensors_file import INDEX_SUFFIX

    return (path / f"{SPARSE_PREFIX}.safetensors").is_file() or (path / f"{SPARSE_PREFIX}{INDEX_SUFFIX}").is_file()


def _declares_packed(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if qc.get("quant_method") != "compressed-tensors":
        return False
    formats = {qc.get("format")} | {g.get("format") for g in (qc.get("config_groups") or {}).values()}
    return FORMAT in formats


def load_packed(path: Path, device: str = "cpu", dtype: torch.dtype | None = None, trust_pickle: bool = False,
                ) -> nn.Module:
    """Load a pack-quantized checkpoint as a plain model with dequantized Linear weights.

    transformers 5.23 loads uniform checkpoints only with CompressedTensorsConfig(dequantize=True)
    and not at all when config groups differ in bit width (it applies one scheme to every
    module); this reads any of them with compressed-tensors' own decompressor, per module scheme.
    """
    import torch
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from orstack.errors import BadInput
    from orstack.io.checkpoint import quiet_transformers

    quiet_transformers()
    dtype = dtype or torch.float32
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    qconfig = QuantizationConfig.model_validate(raw["quantization_config"])
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BadInput(f"{path}: no weight files (*.safetensors) in the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    for name, module in skeleton.named_modules():
        if f"{name}.weight_packed" not in state:
            continue
        scheme = next((s for s in qconfig.config_groups.values()
                       if is_match(name, module, s.targets, qconfig.ignore or [])), None)
        if scheme is None:
            raise BadInput(f"{path}: packed module {name} matches no config group")
        keys = [k for k in state if k.startswith(f"{name}.weight_")]
        local = {k[len(name) + 1:]: state.pop(k) for k in keys}
        state[f"{name}.weight"] = decompress_module(local, scheme, f"{path}: {name}")
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise BadInput(f"{path}: weights do not match the config (missing {sorted(set(missing) - tied)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model.to(device).eval()


def compress_module(q: Quantized, dtype: torch.dtype, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One Linear's packed tensors (weight_packed, weight_scale, weight_zero_point, weight_shape),
    through compressed-tensors' own per-module compressor: the bytes `write_packed` gives.
    With `mask` (bool [out, in], True = kept) the codes are stored in the sparse 4-bit layout
    (2:4 or bitmask, see the module docstring) where that is smaller."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = q.spec
    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group",
                            group_size=spec.group_size)
    local = {"weight": q.dequantize(dtype), "weight_scale": q.scale.to(dtype).clone()}
    if q.zero_point is not None:
        local["weight_zero_point"] = q.zero_point.clone()
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    dense = compressor.compress(local, QuantizationScheme(targets=[], weights=args))
    return dense if mask is None else sparsify(dense, mask, spec.bits, spec.group_size)


def _zero_codes(tensors: dict[str, torch.Tensor], bits: int, group_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """The code of 0 at every position [out, in] (int8, signed as compressed-tensors unpacks):
    0 when symmetric, else the group's zero point."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out_features, in_features = shape
    if "weight_zero_point" not in tensors:
        return torch.zeros(shape, dtype=torch.int8)
    zp = unpack_from_int32(tensors["weight_zero_point"], bits, (out_features, in_features // group_size),
                           packed_dim=0)
    return zp.repeat_interleave(group_size, dim=1)


def sparsify(dense: dict[str, torch.Tensor], mask: torch.Tensor, bits: int, group_size: int,
             ) -> dict[str, torch.Tensor]:
    """A pack-quantized module's tensors re-encoded with only the codes `mask` keeps (2:4 when
    every group of 4 keeps at most 2, else bitmask), or unchanged when that is not smaller."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from orstack.prune.storage import pack_bits

    shape = tuple(int(x) for x in dense["weight_shape"])
    out_features, in_features = shape
    mask = mask.to(torch.bool).cpu()
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask {tuple(mask.shape)} for a weight {shape}")
    codes = unpack_from_int32(dense["weight_packed"], bits, shape)
    if not torch.equal(codes[~mask], _zero_codes(dense, bits, group_size, shape)[~mask]):
        raise RuntimeError("a masked-out weight is not on its group's zero code (pruned weights must stay 0)")
    rest = {k: v for k, v in dense.items() if k != "weight_packed"}
    dense_bytes = dense["weight_packed"].numel() * 4
    groups = mask.reshape(out_features, -1, 4) if in_features % 8 == 0 else None
    if groups is not None and int(groups.sum(-1).max()) <= 2:
        # kept positions first, then the lowest free ones (their codes are zero codes), ascending
        position = torch.arange(4).expand_as(groups)
        chosen = torch.topk(groups.to(torch.int64) * 8 + (3 - position), 2, dim=-1).indices.sort(-1).values
        kept = codes.reshape(out_features, -1, 4).gather(-1, chosen).reshape(out_features, -1)
        two_bit = chosen.reshape(out_features, -1, 4).to(torch.uint8)  # 4 indices per byte
        meta = (two_bit << torch.tensor([0, 2, 4, 6], dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
        packed = pack_to_int32(kept.contiguous(), bits)
        if packed.numel() * 4 + meta.numel() < dense_bytes:
            return {**rest, "weight_packed": packed, "weight_meta": meta.contiguous()}
        return dense
    packed = pack_to_int32(codes[mask].reshape(1, -1).contiguous(), bits)
    bitmask = pack_bits(mask)
    if packed.numel() * 4 + bitmask.numel() < dense_bytes:
        return {**rest, "weight_packed": packed, "weight_bitmask": bitmask}
    return dense


def desparsify(tensors: dict[str, torch.Tensor], bits: int, group_size: int, where: str) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of a module stored in the sparse layout (the inverse of
    `sparsify`); a module stored densely is returned as it is."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    if "weight_meta" not in tensors and "weight_bitmask" not in tensors:
        return tensors
    from orstack.errors import BadInput

    shape = tuple(int(x) for x in tensors["weight_shape"])
    out_features, in_features = shape
    mask = stored_mask(tensors, shape, where)
    n_kept = int(mask.sum())
    rows, length = (out_features, in_features // 2) if "weight_meta" in tensors else (1, n_kept)
    try:
        kept = unpack_from_int32(tensors["weight_packed"], bits, (rows, length))
    except (RuntimeError, ValueError):
        raise BadInput(f"{where}: weight_packed does not hold the codes its mask keeps") from None
    if kept.numel() != n_kept:
        raise BadInput(f"{where}: weight_packed holds {kept.numel()} codes, its mask keeps {n_kept}")
    codes = _zero_codes(tensors, bits, group_size, shape).clone()
    codes[mask] = kept.reshape(-1)
    rest = {k: v for k, v in tensors.items() if k not in ("weight_packed", "weight_meta", "weight_bitmask")}
    return {**rest, "weight_packed": pack_to_int32(codes, bits)}


def stored_mask(tensors: dict[str, torch.Tensor], shape: tuple[int, int], where: str = "") -> torch.Tensor | None:
    """The keep-mask (bool [out, in]) a module's sparse tensors encode; None for a dense module."""
    import torch

    from orstack.errors import BadInput
    from orstack.prune.storage import unpack_bits

    out_features, in_features = shape
    if "weight_meta" in tensors:
        meta = tensors["weight_meta"]
        if in_features % 8 or tuple(meta.shape) != (out_features, in_features // 8):
            raise BadInput(f"{where}: weight_meta {tuple(meta.shape)} does not fit a weight {shape}")
        index = (meta.unsqueeze(-1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3
        index = index.reshape(out_features, -1, 2).to(torch.int64)
        mask = torch.zeros(out_features, in_features // 4, 4, dtype=torch.bool)
        mask.scatter_(-1, index, True)
        if int(mask.sum()) != out_features * in_features // 2:
            raise BadInput(f"{where}: weight_meta repeats a position within a group of 4")
        return mask.reshape(shape)
    if "weight_bitmask" in tensors:
        bitmask = tensors["weight_bitmask"]
        if tuple(bitmask.shape) != (out_features, -(-in_features // 8)):
            raise BadInput(f"{where}: weight_bitmask {tuple(bitmask.shape)} does not fit a weight {shape}")
        return unpack_bits(bitmask, in_features)
    return None


def decompress_module(tensors: dict[str, torch.Tensor], scheme, where: str) -> torch.Tensor:  # noqa: ANN001
    """One module's dequantized weight from its stored tensors (dense or sparse layout)."""
    from compressed_tensors.compressors import BaseCompressor

    weights = scheme.weights
    dense = desparsify(tensors, weights.num_bits, weights.group_size, where)
    return BaseCompressor.get_value_from_registry(FORMAT).decompress(dense, scheme)["weight"]


def input_masks(checkpoint: Path | str):  # noqa: ANN201 - StoredMasks | dict
    """The keep-masks of the matrices `checkpoint` stores sparsely (orstack's sparse prune
    format), read lazily by weight name; empty for any other checkpoint. awq stores exactly
    these matrices in the sparse 4-bit layout."""
    from orstack.prune.storage import is_sparse_checkpoint, stored_masks

    path = Path(checkpoint)
    return stored_masks(path) if path.is_dir() and is_sparse_checkpoint(path) else {}


def packed_writer(directory: Path, sparse: bool):  # noqa: ANN201 - ShardedWriter
    """The writer of a packed output's weights: the sparse layout under its own file names."""
    from orstack.io.safetensors_file import ShardedWriter

    return ShardedWriter(directory, metadata={"format": "pt"}, prefix=SPARSE_PREFIX if sparse else "model")


def packed_format(masks) -> str:  # noqa: ANN001
    """The manifest's weights_format of an awq output written with `masks`."""
    return SPARSE_FORMAT if masks else WEIGHTS_FORMAT


def write_sparse_packed(model: nn.Module, quantized: dict[str, Quantized], out_dir: Path, masks) -> None:  # noqa: ANN001
    """Save `model` with the Linears named in `quantized` stored packed, those `masks` names
    in the sparse layout (the output of `write_packed` when its input was sparse)."""
    from torch import nn

    from orstack.prune.storage import unique_state_dict

    writer = packed_writer(out_dir, sparse=True)
    for name, tensor in unique_state_dict(model).items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in quantized:
            for key, t in compress_module(quantized[module], tensor.dtype, masks.get(name)).items():
                writer.add(f"{module}.{key}", t)
        else:
            writer.add(name, tensor)
    writer.close()
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    write_packed_config(quantized, out_dir, ignore)


def write_packed_config(quantized: dict[str, Quantized], out_dir: Path, ignore: list[str]) -> None:
    """Add the `quantization_config` that `write_packed` writes to out_dir/config.json."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    config = quantization_config(quantized)
    config.quantization_status = QuantizationStatus.COMPRESSED
    for scheme in config.config_groups.values():
        scheme.format = FORMAT
    config.ignore = list(ignore)
    ModelCompressor(quantization_config=config).update_config(str(out_dir))
    _let_transformers_dequantize(out_dir)


def _let_transformers_dequantize(out_dir: Path) -> None:
    """Mark a one-scheme asymmetric checkpoint `dequantize: true` in config.json.

    transformers 5.24 keeps such a checkpoint packed and fails on the packed zero points (a size
    mismatch) unless told to dequantize at load; told so by the config, it loads the same
    logits as orstack. With several schemes (--mixed-precision, --group-size auto) it would
    decompress every module with one scheme -- wrong weights, silently -- so those are left
    unmarked and it refuses them (the size mismatch). Symmetric checkpoints load as they are.
    """
    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    qc = config.get("quantization_config") or {}
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) == 1 and not (groups[0].get("weights") or {}).get("symmetric", True):
        qc["dequantize"] = True
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class PackedReader:
    """A TensorReader over a pack-quantized checkpoint that gives every packed Linear's `weight`
    dequantized (compressed-tensors' decompressor, per module), the rest as stored."""

    SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_meta", "weight_bitmask")

    def __init__(self, directory: Path) -> None:
        from compressed_tensors.quantization import QuantizationConfig

        from orstack.io.safetensors_file import TensorReader

        self.raw = TensorReader(directory)
        self.directory = self.raw.directory
        raw = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        self.qconfig = QuantizationConfig.model_validate(raw["quantization_config"])
        self.packed = {k[: -len(".weight_packed")] for k in self.raw.keys() if k.endswith(".weight_packed")}
        self._names = ([k for k in self.raw.keys() if not self._is_part(k)]
                       + [f"{m}.weight" for m in sorted(self.packed)])

    def _is_part(self, name: str) -> bool:
        module, _, attr = name.rpartition(".")
        return module in self.packed and attr in self.SUFFIXES

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def keys(self) -> list[str]:
        return list(self._names)

    def _module(self, name: str) -> str | None:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        return module if module in self.packed else None

    def shape(self, name: str) -> tuple[int, ...]:
        module = self._module(name)
        if module is None:
            return self.raw.shape(name)
        return tuple(int(x) for x in self.raw.get(f"{module}.weight_shape"))

    def dtype(self, name: str):  # noqa: ANN201 - torch.dtype
        module = self._module(name)
        return self.raw.dtype(f"{module}.weight_scale") if module else self.raw.dtype(name)

    def _local(self, module: str) -> dict[str, torch.Tensor]:
        return {attr: self.raw.get(f"{module}.{attr}") for attr in self.SUFFIXES if f"{module}.{attr}" in self.raw}

    def get(self, name: str) -> torch.Tensor:
        from orstack.errors import BadInput

        module = self._module(name)
        if module is None:
            return self.raw.get(name)
        groups = list(self.qconfig.config_groups.values())
        # orstack names every target; a checkpoint with one group (any targets) has one scheme
        scheme = next((s for s in groups if module in s.targets), groups[0] if len(groups) == 1 else None)
        if scheme is None:
            raise BadInput(f"{self.directory}: packed module {module} matches no config group")
        return decompress_module(self._local(module), scheme, f"{self.directory}: {module}")

    def mask(self, name: str) -> torch.Tensor | None:
        """The keep-mask (bool, True = stored) of a weight stored in the sparse layout, else None:
        the weights a stage working on this checkpoint must keep zero."""
        module = self._module(name)
        if module is None or not any(f"{module}.{a}" in self.raw for a in ("weight_meta", "weight_bitmask")):
            return None
        local = {a: self.raw.get(f"{module}.{a}") for a in ("weight_meta", "weight_bitmask", "weight_shape")
                 if f"{module}.{a}" in self.raw}
        return stored_mask(local, self.shape(name), f"{self.directory}: {module}")

    def masks(self) -> dict[str, torch.Tensor]:
        """Every sparse-stored weight's keep-mask, by weight name."""
        found = {f"{m}.weight": self.mask(f"{m}.weight") for m in sorted(self.packed)}
        return {name: mask for name, mask in found.items() if mask is not None}


def packed_reader(path: Path) -> PackedReader:
    return PackedReader(Path(path))
