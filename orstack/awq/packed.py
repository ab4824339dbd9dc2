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
Embeddings, norms and lm_head stay in the model's dtype.
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


def write_packed(model: nn.Module, quantized: dict[str, Quantized], out_dir: Path) -> None:
    """Save `model` with the Linears named in `quantized` stored packed. The model's Linear
    weights must already be the dequantized values (they are re-coded by compressed-tensors
    and must land on the same codes). The model is compressed in place: do not use it after."""
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


def _quietly(fn, *args):
    """compressed-tensors draws tqdm bars on stderr; orstack shows its own progress."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def is_packed(path: Path) -> bool:
    """A checkpoint directory whose config declares compressed-tensors pack-quantized weights."""
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
    from compressed_tensors.compressors import BaseCompressor
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
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    for name, module in skeleton.named_modules():
        if f"{name}.weight_packed" not in state:
            continue
        scheme = next((s for s in qconfig.config_groups.values()
                       if is_match(name, module, s.targets, qconfig.ignore or [])), None)
        if scheme is None:
            raise BadInput(f"{path}: packed module {name} matches no config group")
        keys = [k for k in state if k.startswith(f"{name}.weight_")]
        local = {k[len(name) + 1:]: state.pop(k) for k in keys}
        state[f"{name}.weight"] = compressor.decompress(local, scheme)["weight"]
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


def compress_module(q: Quantized, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One Linear's packed tensors (weight_packed, weight_scale, weight_zero_point, weight_shape),
    through compressed-tensors' own per-module compressor: the bytes `write_packed` gives."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = q.spec
    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group",
                            group_size=spec.group_size)
    local = {"weight": q.dequantize(dtype), "weight_scale": q.scale.to(dtype).clone()}
    if q.zero_point is not None:
        local["weight_zero_point"] = q.zero_point.clone()
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    return compressor.compress(local, QuantizationScheme(targets=[], weights=args))


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


class PackedReader:
    """A TensorReader over a pack-quantized checkpoint that gives every packed Linear's `weight`
    dequantized (compressed-tensors' decompressor, per module), the rest as stored."""

    SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")

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

    def get(self, name: str) -> torch.Tensor:
        from compressed_tensors.compressors import BaseCompressor

        from orstack.errors import BadInput

        module = self._module(name)
        if module is None:
            return self.raw.get(name)
        groups = list(self.qconfig.config_groups.values())
        # orstack names every target; a checkpoint with one group (any targets) has one scheme
        scheme = next((s for s in groups if module in s.targets), groups[0] if len(groups) == 1 else None)
        if scheme is None:
            raise BadInput(f"{self.directory}: packed module {module} matches no config group")
        local = {attr: self.raw.get(f"{module}.{attr}") for attr in self.SUFFIXES if f"{module}.{attr}" in self.raw}
        return BaseCompressor.get_value_from_registry(FORMAT).decompress(local, scheme)["weight"]


def packed_reader(path: Path) -> PackedReader:
    return PackedReader(Path(path))
