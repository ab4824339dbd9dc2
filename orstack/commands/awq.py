"""`orstack awq`: activation-aware group-wise weight quantization (int3/4/8), stored packed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import (
    Calib,
    DryRun,
    Eval,
    Force,
    MaxPplRise,
    MinRetention,
    NSamples,
    RequiredOutput,
    current_runtime,
)
from orstack.errors import BadInput

HELP = """Quantize the decoder-layer linear weights of a decoder checkpoint to 3, 4 or 8 bits.

Group-wise (--group-size consecutive input weights share a scale and, unless --symmetric,
an integer zero point). AWQ: for each set of linears sharing an input (found by probing
the model: q/k/v after the input norm, gate/up after the post-attention norm, o after v,
down after up) it searches per-channel scales s = mean|x|^alpha on the calibration data,
(and the duo form mean|x|^alpha / mean|w|^(1-alpha)), folds them into the preceding op,
then searches a clipping range per group. --method awq+gptq then rounds by GPTQ instead
(each column's rounding error compensated in the later columns, on the calibration Hessian;
--act-order, --damp); --method gptq skips the scale search. Layers are processed one at a
time on inputs propagated through the quantized layers. --rtn gives
plain round-to-nearest (no calibration). --mixed-precision gives the most sensitive ~10%
of the weights one more bit and the least sensitive one bit less, averaging --bits.

The output stores the weights packed (compressed-tensors "pack-quantized": int codes,
scales, zero points; see docs/awq.md), loadable by every orstack stage and by transformers
(asymmetric: quantization_config=CompressedTensorsConfig(dequantize=True); with
--mixed-precision only a --symmetric output, loaded as is).
--fake-quant writes the dequantized weights as a plain checkpoint instead. A pruned
model keeps its zeros. --group-size auto takes the largest divisor <= 128 of each width.
Gate (exit 3, nothing written unless --force): the output keeps --min-retention (97%) of
the parent's --eval accuracy and of its --heldout perplexity (or rises at most
--max-ppl-rise). --dry-run prints the per-tensor plan (group sizes, bits per weight with
scales and zero points, output size) from the config and weight headers alone.

Example:

\b
    orstack awq model --calib calib.txt -o model-awq --bits 4 --group-size 128 \\
        --nsamples 16 --seqlen 128 --heldout heldout.txt
"""


def _group_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise BadInput(f"--group-size {value}: expected a positive integer or 'auto'") from None
    if size < 1:
        raise BadInput(f"--group-size {value}: expected a positive integer or 'auto'")
    return size


def awq(
    model: Annotated[str, typer.Argument(help="Checkpoint directory (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, "
                                                            "OLMo 2, Granite, SmolLM3, ...).")],
    output: RequiredOutput,
    calib: Calib = None,  # type: ignore[assignment] - required unless --rtn (AWQConfig checks)
    bits: Annotated[int, typer.Option("--bits", help="Bits per weight: 3, 4 or 8.")] = 4,
    group_size: Annotated[str, typer.Option("--group-size", help="Weights per group, or 'auto'.")] = "128",
    symmetric: Annotated[bool, typer.Option("--symmetric", help="No zero point (grid symmetric around 0).")]
    = False,
    rtn: Annotated[bool, typer.Option("--rtn", help="Round-to-nearest baseline (no calibration).")] = False,
    fake_quant: Annotated[bool, typer.Option("--fake-quant", help="Write dequantized float weights.")] = False,
    mixed_precision: Annotated[bool, typer.Option("--mixed-precision", help="Per-layer bits by sensitivity.")]
    = False,
    method: Annotated[str, typer.Option("--method", help="awq (scale search), gptq (error compensation) or "
                                                         "awq+gptq (both).")] = "awq",
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize the most active columns first.")]
    = False,
    damp: Annotated[float, typer.Option("--damp", min=0.0, help="GPTQ dampening (x mean diag H).")] = 0.01,
    nsamples: NSamples = 32,
    seqlen: Annotated[
        int | None, typer.Option("--seqlen", min=8, help="Tokens per calibration sequence "
                                                                "[default: min(512, context)].")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Calibration sequences per forward.")] = 8,
    heldout: Annotated[list[Path] | None, typer.Option("--heldout", help="Held-out text for perplexity.")] = None,
    eval_length: Annotated[int, typer.Option("--eval-length", min=8, help="Perplexity window, tokens.")] = 512,
    eval_tasks: Eval = None,
    min_retention: MinRetention = 0.97,
    max_ppl_rise: MaxPplRise = None,
    force: Force = False,
    dry_run: DryRun = False,
) -> None:
    from orstack.awq import AWQConfig, run

    runtime = current_runtime()
    config = AWQConfig(bits=bits, group_size=_group_size(group_size), symmetric=symmetric, rtn=rtn,
                       mixed_precision=mixed_precision, fake_quant=fake_quant, method=method, act_order=act_order,
                       damp=damp, nsamples=nsamples, seqlen=seqlen,
                       batch_size=batch_size, eval_length=eval_length, seed=runtime.seed,
                       calib=[str(p) for p in calib or []], heldout=[str(p) for p in heldout] if heldout else None,
                       eval_tasks=str(eval_tasks) if eval_tasks is not None else None, min_retention=min_retention,
                       max_ppl_rise=max_ppl_rise, force=force)
    if dry_run:
        from orstack.awq.plan import plan

        plan(model, config).emit()
        return
    result = run(model, output, config, runtime)
    _report(result)
    if config.mixed_precision and not config.symmetric and not config.fake_quant:
        console.warn(f"{result.output}: transformers cannot load a packed checkpoint that mixes bit widths with "
                     "zero points (orstack stages can); use --symmetric or --fake-quant for one it loads")
    console.info(f"wrote {result.output} ({result.weights_bytes / 1e6:.1f} MB of weights)")


def _report(result) -> None:  # noqa: ANN001 - orstack.awq.AWQResult
    metrics = result.metrics
    if result.layers:
        tbl = console.new_table("layer", "alpha (q/k/v, o, gate/up, down)", "error RTN", "error AWQ", "reduction",
                                title="AWQ per layer (summed output error on calibration data)")
        for r in result.layers:
            alphas = ", ".join("-" if a is None else f"{a:.2f}" for a in r.alphas.values())
            tbl.add_row(str(r.layer), alphas, f"{r.error_rtn:.4g}", f"{r.error_awq:.4g}", f"{r.reduction:.1%}")
        console.table(tbl)
        console.info(f"output error vs RTN: {metrics['error_reduction_vs_rtn']:.1%} lower")
    if "group_size_per_layer" in metrics:
        console.info("group sizes (auto): " + ", ".join(f"{k} {v}" for k, v in metrics["group_size_per_layer"].items()))
    if "bits" in metrics:
        console.info(f"mixed precision: average {metrics['average_bits']:.3f} bits; "
                     f"{len(metrics['bits'])} linears off the default width")
    if "ppl_before" in metrics:
        console.info(f"held-out perplexity {metrics['ppl_before']:.3f} -> {metrics['ppl_after']:.3f}")


def register(app: typer.Typer) -> None:
    app.command("awq", help=HELP)(awq)
