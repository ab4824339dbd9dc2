"""GGUF export: a checkpoint as a file llama.cpp runs, validated against its source.

`convert(spec, out, GgufConfig(...))` loads any checkpoint orstack writes, writes the
GGUF to a temporary sibling, checks it in llama.cpp (when llama-cpp-python is
installed) and only then moves it into place; a failed quality gate raises GateFailed
and leaves nothing behind unless `force` is set.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from orstack.errors import BadInput, GateFailed
from orstack.gguf.export import TYPES, ExportResult, check_type

if TYPE_CHECKING:
    from orstack.runtime import Runtime


@dataclass
class GgufConfig:
    type: str = "f16"
    validate: bool | None = None  # None: validate when llama-cpp-python is installed
    prompts: str | None = None  # JSONL with a `prompt` field (e.g. bench tasks); default: built-in prompts
    text: list[str] = field(default_factory=list)  # perplexity text files; default: built-in passage
    n_tokens: int = 100  # greedy tokens compared per prompt
    max_length: int = 512  # perplexity window
    force: bool = False  # write even when the gate fails


@dataclass
class ConvertResult:
    export: ExportResult
    validation: object | None  # orstack.gguf.validate.Validation


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_config(config: GgufConfig) -> GgufConfig:
    """Validate options before anything heavy is loaded."""
    from orstack.io.text import check_text_files

    config.type = check_type(config.type)
    if config.validate and not llama_cpp_available():
        raise BadInput("--validate needs llama-cpp-python (pip install llama-cpp-python), or pass --no-validate")
    if config.prompts is not None and not Path(config.prompts).is_file():
        raise BadInput(f"--prompts {config.prompts}: no such file")
    if config.text:
        check_text_files(config.text, "--text")
    if config.n_tokens < 1 or config.max_length < 16:
        raise BadInput("--tokens must be >= 1 and --max-length >= 16")
    return config


def _prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from orstack.io.jsonl import read_jsonl

    prompts = [row["prompt"] for row in read_jsonl(path, required=("prompt",))]
    if not prompts:
        raise BadInput(f"--prompts {path}: no rows")
    return prompts[:16]


def _awq_blocks(spec: str):
    """Q4_1 blocks taken straight from a packed 4-bit AWQ checkpoint (None for other formats)."""
    from orstack.io.checkpoint import detect_format

    path = Path(str(spec))
    if not path.is_dir() or detect_format(path) != "compressed-tensors-pack-quantized":
        return None
    from orstack.console import info
    from orstack.gguf.awq import awq_q4_1_weights

    blocks = awq_q4_1_weights(path)
    info(f"{spec}: {len(blocks)} packed 4-bit weights mapped straight onto Q4_1 (group sizes multiples of 32)")
    return blocks


def convert(spec: str, out: str | Path, config: GgufConfig, runtime: Runtime) -> ConvertResult:
    """Load `spec` (any orstack checkpoint), write `out` as GGUF, validate, commit atomically."""
    from orstack.console import warn
    from orstack.gguf.export import ARCHITECTURES, export_gguf
    from orstack.io.atomic import atomic_path
    from orstack.io.checkpoint import load_model
    from orstack.io.text import read_texts

    config = check_config(config)
    prompts = _prompts(config.prompts)
    texts = list(read_texts(config.text)) if config.text else None
    do_validate = llama_cpp_available() if config.validate is None else config.validate
    if config.validate is None and not do_validate:
        from orstack.console import warn

        warn("llama-cpp-python is not installed: the GGUF file is not validated")
    model, tokenizer = load_model(spec, dtype="float32", trust_pickle=runtime.trust_pickle,
                                  architectures=tuple(ARCHITECTURES))
    blocks = _awq_blocks(spec) if config.type == "q4_1" else None
    validation = None
    with atomic_path(out) as tmp:
        result = export_gguf(model, tokenizer, tmp, config.type, name=Path(str(spec)).name, q4_1_blocks=blocks)
        if do_validate:
            from orstack.gguf.validate import validate

            validation = validate(model, tokenizer, tmp, config.type, prompts=prompts, texts=texts,
                                  n_tokens=config.n_tokens, max_length=config.max_length)
            if not validation.passed:
                message = (f"{out}: GGUF {config.type} disagrees with the source: greedy agreement "
                           f"{validation.agreement:.1%} (gate {validation.min_agreement:.0%}), perplexity "
                           f"{validation.ppl_gguf:.3f} vs {validation.ppl_source:.3f} "
                           f"({validation.ppl_change:+.2%}, gate ±2%)")
                if not config.force:
                    raise GateFailed(message + "; nothing written (use --force to write anyway)")
                warn(message + "; written anyway (--force)")
    result.path = Path(out)
    return ConvertResult(result, validation)


__all__ = ["TYPES", "ConvertResult", "GgufConfig", "check_config", "convert"]
