"""`orstack gguf` as one call: check -> load -> export -> validate -> gate -> commit.

`run(source, output, GgufConfig(...), runtime)` loads any checkpoint orstack writes, writes
the GGUF to a temporary sibling with the orstack manifest in its metadata, checks it in
llama.cpp (when llama-cpp-python is installed), records the validation figures in the
manifest and only then moves the file into place; a failed quality gate (orstack/gates.py) raises GateTripped
and leaves nothing behind unless `force` is set.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.gguf.export import ExportResult, check_type

if TYPE_CHECKING:
    from orstack.gguf.validate import Validation
    from orstack.runtime import Runtime

NO_IMPORTANCE = ("f32", "f16", "bf16")  # float types: nothing to search
MAX_PROMPTS = 16  # rows of --prompts used for the greedy agreement check


@dataclass
class GgufConfig:
    type: str = "f16"
    validate: bool | None = None  # None: validate when llama-cpp-python is installed
    prompts: str | None = None  # JSONL with a `prompt` field (e.g. bench tasks); default: built-in prompts
    text: list[str] = field(default_factory=list)  # perplexity text files; default: built-in passage
    n_tokens: int = 100  # greedy tokens compared per prompt
    max_length: int = 512  # perplexity window
    force: bool = False  # write even when the gate fails
    min_agreement: float | None = None  # the gate; None: the type's default (orstack/gguf/validate.py)
    max_ppl_change: float | None = None
    imatrix: str | None = None  # calibration text (.txt/.jsonl): importance-weighted quantization


@dataclass
class GgufResult:
    export: ExportResult
    validation: Validation | None
    manifest: dict[str, Any]  # as stored under orstack.manifest in the file's metadata


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_config(config: GgufConfig) -> GgufConfig:
    """Validate options before anything heavy is loaded."""
    from orstack.io.jsonl import check_input_file
    from orstack.io.text import check_text_files

    config.type = check_type(config.type)
    if config.validate and not llama_cpp_available():
        raise BadInput("--validate needs llama-cpp-python (pip install llama-cpp-python), or pass --no-validate")
    if config.prompts is not None:
        check_input_file(config.prompts, "--prompts")
    if config.text:
        check_text_files(config.text, "--text")
    if config.n_tokens < 1 or config.max_length < 16:
        raise BadInput("--tokens must be >= 1 and --max-length >= 16")
    from orstack.gates import check_limits

    check_limits(min_agreement=config.min_agreement, max_ppl_change=config.max_ppl_change)
    if config.imatrix is not None:
        if config.type in NO_IMPORTANCE:
            raise BadInput(f"--imatrix: --type {config.type} is not quantized and takes no importance "
                           "(a quantized type such as q4_k_m does)")
        check_text_files([config.imatrix], "--imatrix")
    return config


def _prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from orstack.io.jsonl import display_name, read_jsonl_numbered

    prompts = []
    for line, row in read_jsonl_numbered(path, required=("prompt",)):
        if not isinstance(row["prompt"], str):
            raise BadInput(f"{display_name(path)}:{line}: field 'prompt' must be a string, "
                           f"got {type(row['prompt']).__name__}")
        prompts.append(row["prompt"])
    if not prompts:
        raise BadInput(f"--prompts {path}: no rows")
    return prompts[:MAX_PROMPTS]


def _awq_weights(spec: str, qtype: str):  # noqa: ANN202 - dict of AwqWeight, or None
    """The packed groups of an AWQ checkpoint, carried into the GGUF blocks (None for other formats)."""
    from orstack.io.checkpoint import detect_format

    path = Path(str(spec))
    if qtype in ("f32", "f16", "bf16") or not path.is_dir() \
            or detect_format(path) != "compressed-tensors-pack-quantized":
        return None
    from orstack.console import info
    from orstack.gguf.awq import read_awq

    weights = read_awq(path)
    info(f"{spec}: {len(weights)} packed AWQ weights carried into the {qtype} blocks where their groups map")
    return weights


def run(source: str, output: str | Path, config: GgufConfig, runtime: Runtime) -> GgufResult:
    """Export checkpoint `source` to the GGUF file `output` (see the module docstring)."""
    from orstack import console
    from orstack.gates import decide
    from orstack.gguf.arch import SUPPORTED, layout
    from orstack.gguf.export import export_gguf
    from orstack.gguf.metadata import MANIFEST_KEY, replace_manifest
    from orstack.io.atomic import atomic_path
    from orstack.io.checkpoint import can_stream, check_checkpoint, load_config, load_model
    from orstack.io.jsonl import dumps
    from orstack.io.manifest import build_manifest
    from orstack.io.output import check_output
    from orstack.io.text import read_texts

    # -- check: options, inputs and the output, before anything is loaded
    config = check_config(config)
    check_output(output, "file", inputs=[source])
    check_checkpoint(source)
    layout(load_config(source), str(source))  # an unsupported family: one line, before any weights load
    device = runtime.torch_device()
    prompts = _prompts(config.prompts)
    texts = list(read_texts(config.text)) if config.text else None
    do_validate = llama_cpp_available() if config.validate is None else config.validate
    if config.validate is None and not do_validate:
        console.warn("llama-cpp-python is not installed: the GGUF file is not validated")

    # -- load
    if runtime.stream and can_stream(source):  # each tensor read, converted and written in turn
        from orstack.io.checkpoint import check_architecture
        from orstack.layerwise import load_streamed

        model, tokenizer = load_streamed(source, device=device, dtype="float32")
        check_architecture(model.config, SUPPORTED, str(source))
    else:
        model, tokenizer = load_model(source, device=device, dtype="float32", trust_pickle=runtime.trust_pickle,
                                      architectures=SUPPORTED)
    awq = _awq_weights(source, config.type)
    importance = None
    if config.imatrix is not None:
        from orstack.gguf.imatrix import collect_importance

        importance = collect_importance(model, tokenizer, config.imatrix)
        console.info(f"importance: {importance.n_tokens} tokens of {config.imatrix} "
                     f"({importance.n_windows} windows of {importance.seqlen}), {len(importance.values)} weights")
        for note in importance.notes:
            console.warn(note)
    manifest = build_manifest("gguf", config, parent=source)
    if importance is not None:
        manifest["imatrix"] = importance.provenance()

    # -- export, validate, gate, commit
    validation = None
    with atomic_path(output) as tmp:
        export = export_gguf(model, tokenizer, tmp, config.type, name=Path(str(source)).name, awq=awq,
                             metadata={MANIFEST_KEY: dumps(manifest)}, importance=importance)
        if do_validate:
            from orstack.gguf.validate import validate
            from orstack.layerwise import resident_while

            # greedy continuations run the source once per token: a streamed source that fits in
            # memory is read once (the tiny's 5.8 MB AWQ checkpoint: 28 s of validation -> a few)
            with resident_while(model):
                validation = validate(model, tokenizer, tmp, config.type, prompts=prompts, texts=texts,
                                      n_tokens=config.n_tokens, max_length=config.max_length,
                                      threads=runtime.threads, min_agreement=config.min_agreement,
                                      max_ppl_change=config.max_ppl_change)
            verdict = decide(f"gguf {config.type}", validation.checks(), config.force)
            manifest["metrics"] = validation.as_dict()
            manifest["gate"] = verdict.record()
            with atomic_path(tmp) as rewritten:
                replace_manifest(tmp, rewritten, dumps(manifest))
        export.size_bytes = tmp.stat().st_size
    export.path = Path(output)
    return GgufResult(export, validation, manifest)
