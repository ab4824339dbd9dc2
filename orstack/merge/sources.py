"""The inputs of a merge, read tensor by tensor, and the checks that they fit together.

Everything here but `get` reads only config files and safetensors headers, so inputs that do
not fit (other architectures, shapes, vocabularies or tokenizers; adapters of other bases)
are refused before a weight is read. `get` opens the file for each tensor and lets it go, so
a merge holds about one tensor per input, never a whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")
# What makes two tokenizers the same: tokenizer.json's parts that change the ids of a text.
TOKENIZER_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")
ADAPTER_PREFIX = "base_model.model."
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class TensorInfo:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: list[int]


def read_headers(directory: Path) -> dict[str, TensorInfo]:
    """name -> (file, dtype, shape) of every tensor of a directory's safetensors files."""
    from safetensors import safe_open

    from orstack.io.safetensors_file import check_weight_files

    infos: dict[str, TensorInfo] = {}
    for path in check_weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                infos[name] = TensorInfo(path, piece.get_dtype(), list(piece.get_shape()))
    if not infos:
        raise BadInput(f"{directory}: no safetensors weights (merge reads *.safetensors only)")
    return infos


def load_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    from safetensors import safe_open

    # Opened per tensor: the mapping is released with the tensor's pages once it is read.
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: cannot read ({type(e).__name__})") from None


def _local_directory(spec: str, option: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise BadInput(f"{option} {spec}: no such checkpoint (merge reads local checkpoint directories)")
    if not path.is_dir():
        raise BadInput(f"{option} {spec}: expected a checkpoint directory (safetensors), got a file")
    return path


@dataclass
class Checkpoint:
    """A Hugging Face checkpoint directory: its config and tensor headers."""

    path: Path
    label: str  # as the user named it
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def get(self, name: str) -> torch.Tensor:
        return load_tensor(self.tensors[name], name)

    @property
    def config_dir(self) -> Path:
        return self.path


@dataclass
class Adapter:
    """A LoRA adapter directory: peft's config, its A/B tensors per module, its base."""

    path: Path
    label: str
    config: dict[str, Any]
    base: Checkpoint
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # base weight name -> (A name, B name)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        alpha = float(self.config.get("lora_alpha") or self.rank)
        return alpha / self.rank ** 0.5 if self.config.get("use_rslora") else alpha / self.rank

    def factors(self, weight: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the module whose weight is `weight` (float32), or None when not adapted."""
        if weight not in self.modules:
            return None
        a, b = self.modules[weight]
        return load_tensor(self.tensors[a], a).float(), load_tensor(self.tensors[b], b).float()

    def delta(self, weight: str) -> torch.Tensor | None:
        """scale * B @ A: what the adapter adds to `weight`."""
        ab = self.factors(weight)
        return None if ab is None else (ab[1] @ ab[0]) * self.scale


@dataclass
class Folded:
    """An adapter seen as the checkpoint it makes: its base with the adapter's delta added."""

    adapter: Adapter

    @property
    def label(self) -> str:
        return self.adapter.label

    @property
    def path(self) -> Path:
        return self.adapter.path

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.adapter.base.tensors

    @property
    def config(self) -> dict[str, Any]:
        return self.adapter.base.config

    @property
    def config_dir(self) -> Path:
        return self.adapter.base.path

    def get(self, name: str) -> torch.Tensor:
        weight = self.adapter.base.get(name)
        delta = self.adapter.delta(name)
        return weight if delta is None else (weight.float() + delta).to(weight.dtype)


def is_adapter(spec: str) -> bool:
    return (Path(spec) / "adapter_config.json").is_file()


def open_checkpoint(spec: str, option: str = "model") -> Checkpoint:
    path = _local_directory(spec, option)
    if not (path / "config.json").is_file():
        raise BadInput(f"{option} {spec}: not a checkpoint directory (no config.json)")
    manifest = _read_json(path / "orstack.json") if (path / "orstack.json").is_file() else {}
    fmt = manifest.get("weights_format")
    if fmt not in (None, "lora-adapter"):
        raise BadInput(f"{option} {spec}: weights stored as '{fmt}'; merge reads dense safetensors checkpoints "
                       "(merge before pruning or quantizing)")
    return Checkpoint(path, spec, _read_json(path / "config.json"), read_headers(path))


def open_adapter(spec: str, option: str = "model") -> Adapter:
    from orstack.train.lora import adapter_base

    path = _local_directory(spec, option)
    config = _read_json(path / "adapter_config.json")
    where = f"{path / 'adapter_config.json'}"
    if config.get("peft_type", "LORA") != "LORA":
        raise BadInput(f"{where}: field 'peft_type': {config.get('peft_type')}; merge reads LoRA adapters")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise BadInput(f"{where}: field '{key}': true; merge reads plain LoRA adapters")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise BadInput(f"{where}: field '{key}': per-module ranks are not supported by merge")
    if config.get("bias", "none") != "none":
        raise BadInput(f"{where}: field 'bias': {config.get('bias')}; merge reads adapters without bias terms")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise BadInput(f"{where}: field 'r': expected a positive integer")
    base = open_checkpoint(adapter_base(path), f"{spec}: base")
    adapter = Adapter(path, spec, config, base, tensors=read_headers(path))
    for name in adapter.tensors:
        if ".lora_A." not in name:
            if ".lora_B." not in name:
                raise BadInput(f"{path}: tensor '{name}' is not a LoRA factor (lora_A/lora_B)")
            continue
        module = name.split(".lora_A.")[0].removeprefix(ADAPTER_PREFIX)
        b_name = name.replace(".lora_A.", ".lora_B.")
        weight = f"{module}.weight"
        if b_name not in adapter.tensors:
            raise BadInput(f"{path}: tensor '{name}' has no lora_B partner")
        if weight not in base.tensors:
            raise BadInput(f"{path}: adapts '{module}', which its base {base.label} does not have")
        a_shape, b_shape = adapter.tensors[name].shape, adapter.tensors[b_name].shape
        out_in = base.tensors[weight].shape
        if [b_shape[0], a_shape[1]] != out_in or a_shape[0] != b_shape[1]:
            raise BadInput(f"{path}: '{module}' factors {b_shape} x {a_shape} do not make the base's {out_in}")
        adapter.modules[weight] = (name, b_name)
    if not adapter.modules:
        raise BadInput(f"{path}: no LoRA factors in the adapter")
    return adapter


def open_input(spec: str, option: str = "model") -> Checkpoint | Adapter:
    return open_adapter(spec, option) if is_adapter(spec) else open_checkpoint(spec, option)


# -- fit checks: config and headers only -------------------------------------------------------

def check_fit(first: Checkpoint, other: Checkpoint) -> None:
    """Same architecture, vocabulary, tensor names and shapes; BadInput naming what differs."""
    arch = lambda c: (c.config.get("model_type"), tuple(c.config.get("architectures") or ()))  # noqa: E731
    if arch(first) != arch(other):
        raise BadInput(f"architectures differ: {first.label} is {_arch_name(first)}, {other.label} is "
                       f"{_arch_name(other)}")
    v1, v2 = first.config.get("vocab_size"), other.config.get("vocab_size")
    if v1 != v2:
        raise BadInput(f"vocabularies differ: {first.label} has vocab_size {v1}, {other.label} {v2}"
                       f"{_first_shape_difference(first, other)}")
    missing = [n for n in first.tensors if n not in other.tensors]
    extra = [n for n in other.tensors if n not in first.tensors]
    if missing or extra:
        name, (has, lacks) = (missing[0], (first, other)) if missing else (extra[0], (other, first))
        raise BadInput(f"tensors differ: '{name}' is in {has.label} but not in {lacks.label}"
                       f" ({len(missing) + len(extra)} names differ)")
    difference = _first_shape_difference(first, other)
    if difference:
        raise BadInput(f"shapes differ: {difference.removeprefix(' (').removesuffix(')')}")


def _arch_name(c: Checkpoint) -> str:
    names = c.config.get("architectures") or []
    return f"{names[0] if names else '?'} (model_type '{c.config.get('model_type')}')"


def _first_shape_difference(first: Checkpoint, other: Checkpoint) -> str:
    for name, info in first.tensors.items():
        theirs = other.tensors.get(name)
        if theirs is not None and theirs.shape != info.shape:
            return f" ('{name}' is {info.shape} in {first.label}, {theirs.shape} in {other.label})"
    return ""


def tokenizer_identity(directory: Path) -> Any:  # noqa: ANN401 - a comparable value
    """What decides how a tokenizer maps text to ids, comparable across directories: the parts
    of tokenizer.json that do, or the bytes of the vocabulary files; None without a tokenizer."""
    tj = directory / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        return json.dumps({k: data.get(k) for k in TOKENIZER_PARTS}, sort_keys=True)
    files = [directory / n for n in ("tokenizer.model", "vocab.json", "merges.txt") if (directory / n).is_file()]
    return tuple(f.read_bytes() for f in files) or None


def tokenizer_dir(source: Checkpoint | Adapter) -> Path:
    """Where an input's tokenizer is: its own directory, else (adapters) its base's."""
    if any((source.path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return source.path
    return source.base.path if isinstance(source, Adapter) else source.path


def check_tokenizers(sources: list[Checkpoint | Adapter]) -> None:
    first = sources[0]
    mine = tokenizer_identity(tokenizer_dir(first))
    for other in sources[1:]:
        if tokenizer_identity(tokenizer_dir(other)) != mine:
            raise BadInput(f"tokenizers differ: {first.label} and {other.label} map text to different ids "
                           "(tokenizer.json's vocabulary, merges, added tokens or normalization)")


def same_base(first: Adapter, other: Adapter) -> bool:
    from orstack.io.manifest import weights_digest

    a, b = first.base.path.resolve(), other.base.path.resolve()
    return a == b or weights_digest(a) == weights_digest(b)


def check_adapters(adapters: list[Adapter]) -> None:
    first = adapters[0]
    for other in adapters[1:]:
        if not same_base(first, other):
            raise BadInput(f"adapters of different bases: {first.label} adapts {first.base.label}, {other.label} "
                           f"adapts {other.base.label}")


def is_float(info: TensorInfo) -> bool:
    return info.dtype in FLOAT_DTYPES
