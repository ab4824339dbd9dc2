"""`orstack gguf`: export a checkpoint to a GGUF file that llama.cpp runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import DryRun, Force, RequiredOutput, current_runtime

HELP = """Export a decoder checkpoint to GGUF for llama.cpp: llama, mistral, qwen2, qwen3, gemma, gemma2,
gemma3_text, phi3, olmo2 (and olmo3), granite, smollm3.

Reads every checkpoint orstack writes (vocab-trimmed, pruned, fake-quant, packed AWQ).
Writes architecture metadata, the tokenizer (byte-level BPE with its pre-tokenizer chosen
from what tokenizer.json does, so custom and trimmed tokenizers convert; or
SentencePiece-style BPE with byte fallback), special tokens and the chat template. For a
packed AWQ checkpoint, AWQ's codes, scales and zero points are carried into the blocks of
every quantized type: exactly for q4_1/q8_0 (and q4_0 from a --symmetric AWQ, Q5_0/Q5_1
fallbacks) when groups are multiples of 32; K-quant sub-blocks take AWQ's codes, scales and
mins (per super-block, whichever of that and the type's own search reproduces the AWQ
weight better).

--type names the type of every 2-D weight; q4_k, q5_k and q6_k are K-quants made by
orstack itself (byte-identical to llama.cpp's reference quantizers);
q4_k_m and q5_k_m follow llama.cpp's Q4_K_M / Q5_K_M mixes (Q6_K for the output and
for attn_v / ffn_down in some layers); their tensors and bytes match llama.cpp's own
quantizer (benchmarks/export_gguf.py puts it beside ours).
Tensors whose rows do not fit a type's block fall back (Q4_K->Q5_0, Q5_K->Q5_1,
Q6_K->Q8_0, else F16), listed per tensor. Norms and biases stay F32.

--validate (default when llama-cpp-python is installed) loads the file in llama.cpp and
compares it with the source: greedy-token agreement over --tokens tokens per prompt and
perplexity; every type has a gate: f32/f16 need >= 99% agreement, q8_0/bf16/q6_k/q5_k/
q5_k_m >= 95%, and all of these a perplexity within 2%; the 4-bit types >= 90% and 5%
(--min-agreement, --max-ppl-change override); f32 also needs every logit within 1% of the
largest source logit; otherwise the command exits 3 and writes nothing (unless --force).
--imatrix CALIB collects, layer by layer over the calibration text, each Linear's mean
squared input per column and uses it as the weights of every quantized type's scale/min
search (K-quants and Q4_0/Q4_1/Q5_0/Q5_1, bytes identical to llama.cpp's quantizer given the
same importance; Q8_0, which llama.cpp quantizes without importance, keeps per block its
reference scale or a weighted search, whichever is better); the calibration file, its sha256,
the sha256 of the importance values and the token count go into the metadata
(quantize.imatrix.*, orstack.imatrix.sha256) and the manifest. Without it the bytes are
llama.cpp's reference ones.
--dry-run prints the per-tensor plan (GGML type, K-quant fallbacks, real bits per weight,
file size) from the config and weight headers alone.

The file carries orstack's manifest (stage, options, parent checkpoint, lineage and the
validation figures) as JSON in the metadata key orstack.manifest.

Example:

\b
    orstack gguf tiny -o tiny-q8.gguf --type q8_0
    orstack gguf tiny -o tiny-q5km.gguf --type q5_k_m --prompts tasks/heldout.jsonl
    orstack gguf tiny -o tiny-q4km.gguf --type q4_k_m --imatrix tasks/train.jsonl
"""


def gguf(
    model: Annotated[str, typer.Argument(help="Checkpoint directory (any format orstack writes).")],
    output: RequiredOutput,
    qtype: Annotated[str, typer.Option("--type", "-t", help="f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k, "
                                                           "q4_k_m or q5_k_m.")] = "f16",
    validate: Annotated[bool | None, typer.Option("--validate/--no-validate",
                                                   help="Check the file in llama.cpp against the source "
                                                        "(default: when llama-cpp-python is installed).")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="JSONL with a 'prompt' field for the greedy "
                                                                   "agreement check (first 16 rows).")] = None,
    text: Annotated[list[Path] | None, typer.Option("--text", help="Held-out text (.txt/.jsonl) for the perplexity "
                                                                   "check. Repeatable.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Greedy tokens compared per prompt.")] = 100,
    max_length: Annotated[int, typer.Option("--max-length", min=16, help="Perplexity window (tokens).")] = 512,
    force: Force = False,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", min=0.0, max=1.0,
                                                         help="Gate: least greedy agreement [default: per "
                                                              "type, 0.90-0.99].")] = None,
    max_ppl_change: Annotated[float | None, typer.Option("--max-ppl-change", min=0.0,
                                                          help="Gate: largest |perplexity change| [default: "
                                                               "0.02, 4-bit types 0.05].")] = None,
    imatrix: Annotated[Path | None, typer.Option("--imatrix", metavar="CALIB",
                                                  help="Calibration text (.txt/.jsonl): weight each quantized "
                                                       "column's error by its mean squared activation "
                                                       "(llama.cpp's imatrix). Not the evaluation text.")] = None,
    dry_run: DryRun = False,
) -> None:
    from orstack.gguf import GgufConfig, run

    config = GgufConfig(type=qtype, validate=validate, prompts=str(prompts) if prompts else None,
                        text=[str(t) for t in text or []], n_tokens=tokens, max_length=max_length, force=force,
                        min_agreement=min_agreement, max_ppl_change=max_ppl_change,
                        imatrix=str(imatrix) if imatrix else None)
    if dry_run:
        from orstack.gguf.plan import plan

        plan(model, config).emit()
        return
    _report(run(model, output, config, current_runtime()), config.type)


def _report(result, qtype: str) -> None:  # noqa: ANN001 - orstack.gguf.GgufResult
    from collections import Counter

    export = result.export
    for note in export.vocab_notes:
        console.info(f"tokenizer: {note}")
    special = [t for t in export.tensors if t.note]
    if special:
        tbl = console.new_table("tensor", "shape", "type", "why", title=f"tensors not stored as {qtype}")
        for t in special:
            tbl.add_row(t.name, "x".join(map(str, t.shape)), t.ggml_type, t.note)
        console.table(tbl)
    counts = Counter(t.ggml_type for t in export.tensors)
    sizes = Counter()
    for t in export.tensors:
        sizes[t.ggml_type] += t.nbytes
    tbl = console.new_table("type", "tensors", "MB", title=f"{export.path} ({export.arch}, {export.file_type})")
    for ggml_type, n in sorted(counts.items()):
        tbl.add_row(ggml_type, str(n), f"{sizes[ggml_type] / 1e6:.2f}")
    console.table(tbl)
    v = result.validation
    if v is not None:
        gate = f"gate >= {v.min_agreement:.0%}, ppl ±{v.ppl_tolerance:.0%}" if v.gated else "not gated"
        console.info(f"validation (llama.cpp): greedy agreement {v.agreement:.1%} of {v.n_compared} tokens, "
                     f"perplexity {v.ppl_gguf:.3f} vs source {v.ppl_source:.3f} ({v.ppl_change:+.2%}), max logit "
                     f"difference {v.max_logit_diff:.2g} of {v.logit_scale:.3g}; {gate}")
    console.info(f"wrote {export.path} ({export.size_bytes / 1e6:.2f} MB, {export.seconds:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("gguf", help=HELP)(gguf)
