"""Loading and saving causal-LM checkpoints: the one home of checkpoint I/O.

A checkpoint is a Hugging Face directory (config.json, safetensors weights, tokenizer
files), optionally with orstack's manifest. Stages whose outputs need special loading
(sparse storage, packed 4-bit, LoRA adapters, .orz packs) register a loader in
`FORMAT_LOADERS`; `detect_format` picks it, so every stage reads every checkpoint that
orstack writes through `load_model`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path
from orstack.io.gguf_file import check_gguf
from orstack.io.manifest import build_manifest, read_manifest, write_manifest
from orstack.io.safetensors_file import check_weight_files

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Kept for callers that name it; what the compression stages support is decided by structure
# (orstack.architectures.check_config), not by this list.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
# The structural family check (it builds a weightless model from the config; lives with the
# rest of the structural knowledge, a layer above io, so it is called by reference).
STRUCTURAL_CHECK = "orstack.architectures:check_config"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# format name -> "module:function"; the function takes (path, device, dtype, trust_pickle) and returns a model.
# The module is imported only when a checkpoint of that format is loaded.
FORMAT_LOADERS: dict[str, str] = {}
# format name -> predicate on a checkpoint directory; checked in order, first match wins.
FORMAT_DETECTORS: list[tuple[str, Callable[[Path], bool]]] = []
# format name -> "module:function" giving a tensor reader over the directory (the interface of
# orstack.io.safetensors_file.TensorReader, weights decoded to what the model holds): the
# formats a stage can stream layer by layer. Plain safetensors ("hf") needs none.
FORMAT_READERS: dict[str, str] = {}
# format name -> "module:function" giving the directory that holds the tokenizer, for formats
# whose path is not itself a tokenizer directory (a .orz pack, say).
FORMAT_TOKENIZERS: dict[str, str] = {}
# format name -> "module:function" predicate: whether a one-file checkpoint of that format (a .orz
# pack) holds weights its reader can give tensor by tensor. Directories are decided by their files.
FORMAT_STREAMS: dict[str, str] = {}


def register_format(name: str, loader: str, detect: Callable[[Path], bool], tokenizer: str | None = None,
                    reader: str | None = None, streams: str | None = None) -> None:
    FORMAT_LOADERS[name] = loader
    FORMAT_DETECTORS.append((name, detect))
    if tokenizer is not None:
        FORMAT_TOKENIZERS[name] = tokenizer
    if reader is not None:
        FORMAT_READERS[name] = reader
    if streams is not None:
        FORMAT_STREAMS[name] = streams


def _call(ref: str, *args: Any) -> Any:
    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)(*args)


def detect_format(path: Path) -> str:
    """'hf' for a plain Hugging Face directory, or the name of a registered special format."""
    _register_builtin_formats()
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest and manifest.get("weights_format") in FORMAT_LOADERS:
        return manifest["weights_format"]
    for name, detect in FORMAT_DETECTORS:
        if detect(path):
            return name
    return "hf"


_builtin_registered = False


def _register_builtin_formats() -> None:
    """Stages that write special formats declare them in `orstack/io/formats.py`."""
    global _builtin_registered
    if not _builtin_registered:
        _builtin_registered = True
        try:
            importlib.import_module("orstack.io.formats")
        except ModuleNotFoundError as e:
            if e.name != "orstack.io.formats":
                raise


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def resolve_checkpoint(spec: str | Path) -> Path | str:
    """A local checkpoint path, or a hub id; a missing or non-checkpoint path is bad input.

    Local weights are checked cheaply here, before any work: every safetensors header against
    its file's size (and a sharded index against its shards), a .gguf file's header and tensor
    extents."""
    s = str(spec)
    p = Path(s)
    if p.exists():
        if p.is_dir():
            if not (p / "config.json").exists() and detect_format(p) == "hf":
                raise BadInput(f"{p}: not a checkpoint directory (no config.json)")
            check_weight_files(p)
        elif p.suffix.lower() == ".gguf":
            check_gguf(p)
        return p
    if is_hub_id(s) and not s.startswith((".", "/")):
        return s
    raise BadInput(f"{s}: no such checkpoint")


def checkpoint_directory(source: Path | str) -> Path | str:
    """The directory that holds a checkpoint's config and tokenizer: a registered format's own
    (a .orz pack's unpacked copy), the base of a derived checkpoint that keeps neither (a LoRA
    adapter), else the checkpoint itself."""
    if not isinstance(source, Path):
        return source
    fmt = detect_format(source)
    if fmt in FORMAT_TOKENIZERS:
        return Path(_call(FORMAT_TOKENIZERS[fmt], source))
    if source.is_dir() and not (source / "config.json").exists():
        base = (read_manifest(source) or {}).get("base")
        if base:
            return _base_checkpoint(source, str(base))
    return source


def _base_checkpoint(derived: Path, base: str) -> Path | str:
    # A relative base that does not exist from here is tried relative to the derived checkpoint.
    if not Path(base).exists() and (derived.parent / base).exists():
        base = str(derived.parent / base)
    return resolve_checkpoint(base)


def _check_weights_are_safe(path: Path, trust_pickle: bool) -> None:
    names = {f.name for f in path.iterdir()}
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if not has_safetensors and has_pickle and not trust_pickle:
        raise BadInput(f"{path}: weights are pickle files, which can run code when loaded; "
                       "convert them to safetensors or pass --trust-pickle")
    if not has_safetensors and not has_pickle:
        raise BadInput(f"{path}: no weight files (*.safetensors) in the checkpoint")


def load_config(spec: str | Path) -> Any:
    from transformers import AutoConfig

    source = checkpoint_directory(resolve_checkpoint(spec))
    if isinstance(source, Path) and source.is_file():
        raise BadInput(f"{spec}: expected a checkpoint directory, got a file")
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{spec}: cannot read config ({_first_line(e)})") from None


def causal_lm_classes() -> set[str]:
    """The class names transformers maps to AutoModelForCausalLM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def check_causal_lm(config: Any, where: str) -> None:
    """Refuse a model that is not a causal language model (an encoder such as BERT or MiniLM,
    a classifier), from its config alone: its `architectures`, else its model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    architectures = [str(a) for a in getattr(config, "architectures", None) or []]
    if architectures:
        causal = causal_lm_classes()
        if any(a in causal or a.endswith("ForCausalLM") for a in architectures):
            return
        name = architectures[0]
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    else:
        name = type(config).__name__.removesuffix("Config") + " model"
    raise BadInput(f"{where}: {name} is not a causal language model (model_type '{model_type}')")


def check_checkpoint(spec: str | Path, *, causal_lm: bool = True) -> Path | str:
    """Everything about a model input that can be checked without loading weights: it exists,
    its weight headers are sound, its config reads and (by default) it is a causal LM. For a
    stage's up-front checks; returns what resolve_checkpoint returns."""
    source = resolve_checkpoint(spec)
    if not (isinstance(source, Path) and source.suffix.lower() == ".gguf"):
        config = load_config(source)
        if causal_lm:
            check_causal_lm(config, str(spec))
    return source


def check_architecture(config: Any, supported: tuple[str, ...] | None = None, where: str = "") -> None:
    """Refuse a config whose model type is not in `supported`; with no list, the structural check
    of the compression stages (decoder layers made of Linears, no mixture-of-experts), which
    names what is supported. Either way before any weight is read."""
    if supported is None:
        _call(STRUCTURAL_CHECK, config, where)
        return
    model_type = getattr(config, "model_type", None)
    if model_type not in supported:
        raise BadInput(f"{where or 'model'}: unsupported architecture '{model_type}' "
                       f"(supported: {', '.join(supported)})")


def resolve_dtype(name: str | None) -> torch.dtype:
    import torch

    table = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32,
             "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise BadInput(f"unknown dtype '{name}' (use float32, float16 or bfloat16)")
    return table[name]


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source = _tokenizer_source(resolve_checkpoint(spec))
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BadInput(f"{spec}: cannot load tokenizer ({_first_line(e)})") from None


def _tokenizer_source(source: Path | str) -> Path | str:
    """Packs keep the tokenizer inside; adapters and other derived checkpoints may keep it
    with their base."""
    source = checkpoint_directory(source)
    if isinstance(source, Path) and source.is_dir():
        has_tok = any((source / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        base = (read_manifest(source) or {}).get("base")
        if not has_tok and base:
            return _base_checkpoint(source, str(base))
    return source


def load_model(
    spec: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    trust_pickle: bool = False,
    architectures: tuple[str, ...] | None = None,
    with_tokenizer: bool = True,
    causal_lm: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM (and its tokenizer) from a checkpoint directory, a special orstack
    format, or a hub id. `architectures` restricts the accepted model types; a model that is
    not a causal LM (an encoder) is refused before its weights are read unless `causal_lm=False`."""
    source = resolve_checkpoint(spec)
    torch_dtype = resolve_dtype(dtype)
    fmt = detect_format(source) if isinstance(source, Path) else "hf"
    if fmt == "hf" and isinstance(source, Path) and source.is_file():
        raise BadInput(f"{source}: expected a checkpoint directory, got a file")
    config = load_config(source)
    if causal_lm:
        check_causal_lm(config, str(spec))
    if fmt != "hf":
        model = _call(FORMAT_LOADERS[fmt], source, device, torch_dtype, trust_pickle)
        if architectures:
            check_architecture(model.config, architectures, str(spec))
    else:
        if architectures:
            check_architecture(config, architectures, str(spec))
        if isinstance(source, Path):
            _check_weights_are_safe(source, trust_pickle)
        model = _from_pretrained(source, torch_dtype, trust_pickle)
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return model, tokenizer


def can_stream(spec: str | Path) -> bool:
    """Whether a checkpoint's weights can be read one tensor at a time: a local directory of
    safetensors files, plain or in a format that registered a reader, or a one-file format
    (a .orz pack) whose reader can read what it holds."""
    if not isinstance(spec, Path) and is_hub_id(str(spec)):
        return False
    path = Path(spec)
    if path.is_file():  # a one-file format (a .orz pack) says whether its reader can read its weights
        fmt = detect_format(path)
        return fmt in FORMAT_READERS and fmt in FORMAT_STREAMS and bool(_call(FORMAT_STREAMS[fmt], path))
    if not path.is_dir() or not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return False
    fmt = detect_format(path)
    return fmt == "hf" or fmt in FORMAT_READERS


def open_weights(spec: str | Path) -> Any:
    """A tensor reader over a checkpoint directory or pack (see can_stream); BadInput otherwise."""
    from orstack.io.safetensors_file import TensorReader

    path = Path(spec)
    if not can_stream(path):
        raise BadInput(f"{spec}: not a directory of safetensors weights that can be read tensor by tensor")
    fmt = detect_format(path)
    return TensorReader(path) if fmt == "hf" else _call(FORMAT_READERS[fmt], path)


def quiet_transformers() -> None:
    """transformers' own progress bars and advice would mix with orstack's messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _from_pretrained(source: Path | str, torch_dtype: torch.dtype, trust_pickle: bool) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(source), dtype=torch_dtype, use_safetensors=None if trust_pickle else True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{source}: cannot load model ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | Path,
    *,
    stage: str,
    args: Any,
    parent: str | Path | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    write_weights: Callable[[Path], None] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint plus `orstack.json`, atomically.

    `write_weights(tmpdir)` replaces the default `save_pretrained` (for stages that store
    weights in their own layout); the config, tokenizer and manifest are written either way.
    """
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        quiet_transformers()
        if write_weights is None:
            model.save_pretrained(tmp)
        else:
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            write_weights(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, build_manifest(stage, args, parent=parent, metrics=metrics, extra=extra))
    return out
