"""The vocab-trim stage: `run(source, output, config, runtime)` checks, loads, trims, gates and saves."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orstack.gates import decide
from orstack.io.jsonl import check_input_file
from orstack.io.output import check_output
from orstack.io.text import check_text_files, read_texts
from orstack.layerwise import cleans_staging
from orstack.runtime import Runtime
from orstack.vocab_trim.trim import VocabTrimConfig, check_corpus, plan_trim, read_keep_file, vocab_trim


@dataclass
class VocabTrimResult:
    output: Path
    metrics: dict[str, Any]  # as written to the manifest
    gate_failures: list[str] = field(default_factory=list)  # non-empty only when written with force
    weights_before: int = 0  # bytes of *.safetensors in the source directory (0 for other sources)
    weights_after: int = 0


@cleans_staging
def run(source: str | Path, output: str | Path, config: VocabTrimConfig, runtime: Runtime,
        report: Callable[[dict[str, Any]], None] | None = None) -> VocabTrimResult:
    """Trim the vocabulary of `source` to the tokens config.corpus uses and write `output`.

    `report(metrics)` is called once the trim is measured, before the quality gate decides,
    so the numbers are shown even when the gate refuses the result (GateTripped, nothing
    written, unless config.force)."""
    from orstack.io.checkpoint import (
        can_stream,
        check_checkpoint,
        checkpoint_directory,
        load_config,
        load_model,
        load_tokenizer,
        save_checkpoint,
    )
    from orstack.layerwise import Staging, load_streamed
    from orstack.vocab_trim.streamed import streamed_slicer

    start = time.perf_counter()
    config.check()
    device = runtime.torch_device()
    check_text_files(config.corpus, "--corpus")
    for path, option in ((config.keep, "--keep"), (config.validate, "--validate")):
        if path is not None:
            check_input_file(path, option)
    check_output(output, "dir", inputs=[source, *config.corpus, config.keep, config.validate])
    output = Path(output)
    resolved = check_checkpoint(source)
    # Every text input is read once before the work, so a malformed one is one line naming it.
    check_corpus(config.corpus)
    if config.keep is not None:
        read_keep_file(config.keep)
    if config.validate is not None:
        for _ in read_texts([config.validate]):
            pass
    # Tokenizer and corpus first: a tokenizer that cannot be trimmed, or an impossible
    # --max-vocab, is reported before the weights are read.
    tokenizer = load_tokenizer(source)
    plan = plan_trim(tokenizer, [load_config(source), _generation_config(checkpoint_directory(resolved))], config)
    # safetensors weights are copied tensor by tensor (the same output; orstack/vocab_trim/streamed.py)
    staging = Staging(output) if runtime.stream and can_stream(resolved) else None
    if staging is not None:
        model, _ = load_streamed(resolved, device=device, with_tokenizer=False)
    else:
        model, _ = load_model(source, device=device, trust_pickle=runtime.trust_pickle, with_tokenizer=False)
    result = vocab_trim(model, tokenizer, config, plan=plan,
                        slicer=streamed_slicer(staging.path) if staging is not None else None)
    if report is not None:
        report(result.metrics)
    verdict = decide("vocab-trim", result.checks, config.force)
    metrics = {**result.metrics, "seconds": round(time.perf_counter() - start, 1)}
    save_checkpoint(result.model, result.tokenizer, output, stage="vocab-trim", args=config, parent=source,
                    metrics=metrics, extra={"vocab_map": {"old_to_new": result.plan.old_to_new},
                                            "gate": verdict.record()},
                    write_weights=staging.move_weights if staging is not None else None)
    if staging is not None:
        staging.cleanup()
    return VocabTrimResult(output=output, metrics=metrics, gate_failures=[c.describe() for c in verdict.failures],
                           weights_before=_weights_bytes(Path(str(source))), weights_after=_weights_bytes(output))


def _generation_config(directory: str | Path) -> Any:  # noqa: ANN401 - GenerationConfig or None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError):
        return None


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0

