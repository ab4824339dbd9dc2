"""`orstack prune`: remove weights (magnitude, Wanda, SparseGPT; unstructured or N:M)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import (
    Calib,
    DryRun,
    Dtype,
    Eval,
    Force,
    MaxPplRise,
    MinRetention,
    NSamples,
    RequiredOutput,
    current_runtime,
)

HELP = """Prune the decoder-layer linear weights of a decoder checkpoint.

Methods: magnitude (|W|), wanda (|W| x ||X||_2 of the calibration inputs, per output row)
and sparsegpt (column blocks with the inverse-Hessian update). Either --sparsity S
(unstructured: every output row loses the fraction S; --attn-sparsity / --mlp-sparsity
override it per module type) or --pattern N:M (exactly N zeros in every group of M
consecutive input weights, e.g. 2:4). Layers are pruned one at a time on calibration
inputs propagated through the already-pruned layers. Embeddings stay dense, and lm_head
too unless --prune-lm-head (refused when it is tied to the embeddings).

--gradual K reaches the target in K equal stages; --recover DATA --steps N fine-tunes
after each stage with pruned weights kept exactly zero. --grid 0.5,0.6,0.7 tries each
level and keeps the best by score = -ln(ppl) - SIZE_WEIGHT x (stored bytes / dense bytes).
Perplexity is measured on --heldout (or the start of the calibration text) before and
after; the manifest records it with per-layer sparsity. Gate (exit 3, nothing written
unless --force): the output keeps --min-retention (97%) of the parent's --eval accuracy
and of its --heldout perplexity (or rises at most --max-ppl-rise). --dry-run prints the
per-tensor plan from the config and weight headers alone. --compress (default) stores the
pruned matrices as bitmask + kept values (docs/prune.md), read by every orstack stage;
--no-compress writes a plain checkpoint any transformers loads.

Example:

\b
    orstack prune model --calib calib.txt -o pruned --method wanda --pattern 2:4 \\
        --nsamples 32 --seqlen 128 --heldout heldout.txt
"""

Method = Annotated[str, typer.Option("--method", help="magnitude, wanda or sparsegpt.")]


def prune(
    model: Annotated[str, typer.Argument(help="Checkpoint directory (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, "
                                                            "OLMo 2, Granite, SmolLM3, ...).")],
    calib: Calib,
    output: RequiredOutput,
    method: Method = "wanda",
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Unstructured sparsity per output row, in "
                                                                      "[0, 1) [default: 0.5; not with --pattern "
                                                                      "or --grid].")] = None,
    pattern: Annotated[str | None, typer.Option("--pattern", help="N:M pattern, e.g. 2:4 (N zeros per M).")] = None,
    attn_sparsity: Annotated[float | None, typer.Option("--attn-sparsity", help="Sparsity of self_attn linears.")]
    = None,
    mlp_sparsity: Annotated[float | None, typer.Option("--mlp-sparsity", help="Sparsity of mlp linears.")] = None,
    nsamples: NSamples = 128,
    seqlen: Annotated[
        int | None, typer.Option("--seqlen", min=8, help="Tokens per calibration sequence "
                                                                "[default: min(512, context)].")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Calibration sequences per forward.")] = 8,
    blocksize: Annotated[int, typer.Option("--blocksize", min=1, help="SparseGPT column block.")] = 128,
    damp: Annotated[float, typer.Option("--damp", min=0.0, help="SparseGPT dampening (x mean diag H).")] = 0.01,
    gradual: Annotated[int, typer.Option("--gradual", min=1, help="Reach the target in K stages.")] = 1,
    recover: Annotated[
        Path | None, typer.Option("--recover", help="Text/JSONL for the mask-preserving recovery fine-tune.")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=0, help="Recovery steps per stage [default: 50 "
                                                                     "with --recover].")] = None,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Recovery learning rate (AdamW).")] = 1e-4,
    grid: Annotated[str | None, typer.Option("--grid", help="Sparsities to try, e.g. 0.5,0.6,0.7.")] = None,
    size_weight: Annotated[float, typer.Option("--size-weight", min=0.0, help="Size penalty weight of --grid.")]
    = 1.0,
    compress: Annotated[bool, typer.Option("--compress/--no-compress", help="Store pruned matrices sparsely.")]
    = True,
    prune_lm_head: Annotated[
        bool, typer.Option("--prune-lm-head", help="Also prune lm_head (not when tied to the embeddings).")
    ] = False,
    heldout: Annotated[list[Path] | None, typer.Option("--heldout", help="Held-out text for perplexity.")] = None,
    eval_length: Annotated[int, typer.Option("--eval-length", min=8, help="Perplexity window, tokens.")] = 512,
    dtype: Dtype = "float32",
    eval_tasks: Eval = None,
    min_retention: MinRetention = 0.97,
    max_ppl_rise: MaxPplRise = None,
    force: Force = False,
    dry_run: DryRun = False,
) -> None:
    from orstack.prune import PruneConfig, parse_grid, run

    runtime = current_runtime()
    config = PruneConfig(
        method=method, sparsity=sparsity, pattern=pattern, attn_sparsity=attn_sparsity, mlp_sparsity=mlp_sparsity,
        nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, blocksize=blocksize, damp=damp, gradual=gradual,
        steps=steps, lr=lr, grid=parse_grid(grid) if grid is not None else None, size_weight=size_weight,
        compress=compress, prune_lm_head=prune_lm_head, eval_length=eval_length, dtype=dtype, seed=runtime.seed,
        calib=[str(p) for p in calib], recover=str(recover) if recover is not None else None,
        heldout=[str(p) for p in heldout] if heldout else None,
        eval_tasks=str(eval_tasks) if eval_tasks is not None else None, min_retention=min_retention,
        max_ppl_rise=max_ppl_rise, force=force,
    )
    if dry_run:
        from orstack.prune.plan import plan

        plan(model, config).emit()
        return
    result = run(model, output, config, runtime)
    metrics = result.metrics
    if "grid" in metrics:
        _grid_table(metrics["grid"], config.size_weight)
    console.info(f"sparsity {metrics['sparsity']:.4f}, perplexity {metrics['ppl_before']:.3f} -> "
                 f"{metrics['ppl_after']:.3f}")
    size = result.weights_bytes
    console.info(f"wrote {result.output}" + (f" ({size / 1e6:.1f} MB)" if size else ""))


def _grid_table(rows: list[dict], size_weight: float) -> None:
    tbl = console.new_table("sparsity", "achieved", "ppl", "size", "score", "kept",
                            title=f"grid: score = -ln(ppl) - {size_weight} x size")
    for r in rows:
        tbl.add_row(f"{r['sparsity']:.2f}", f"{r['achieved']:.3f}", f"{r['ppl']:.3f}",
                    f"{r['size_fraction']:.1%}", f"{r['score']:.4f}", "yes" if r["best"] else "")
    console.table(tbl)


def register(app: typer.Typer) -> None:
    app.command("prune", help=HELP)(prune)
