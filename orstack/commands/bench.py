"""`orstack bench`: accuracy, perplexity, speed, memory and size of models, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import Force, Output, current_runtime
from orstack.errors import BadInput, GateFailed

HELP = """Benchmark models: task accuracy, perplexity, speed, memory and size, side by side.

MODEL is a Hugging Face checkpoint directory (every checkpoint orstack writes, including
LoRA adapters, sparse, packed 4-bit and .orz models) or a .gguf file (llama.cpp backend).
Tasks (JSONL: id, prompt, kind, answer/choices/tests) are answered greedily in batches and
scored by kind: numeric (last number, tolerance), exact (normalised match), choice
(highest log-likelihood choice) or code (run against `tests` in a sandboxed worker pool
with time and memory limits, no network, writes confined to a throw-away directory).
One Result row per task per model goes to standard output (or -o); a side-by-side table
with deltas against the first model, and each model's lineage, goes to standard error.

--score ROWS.jsonl scores rows that already carry `output` by the same rules, without a model.
--fail-under ACC exits 3 (writing nothing unless --force) when a model's accuracy is below ACC.

Example:

    orstack bench tiny --tasks tasks/heldout.jsonl --ppl tasks/heldout.txt --speed -o results.jsonl --summary s.json
"""


def bench(
    models: Annotated[list[str] | None, typer.Argument(help="Checkpoint directories or .gguf files.",
                                                       show_default=False)] = None,
    tasks: Annotated[Path | None, typer.Option("--tasks", help="Task JSONL ('-' for stdin).")] = None,
    score: Annotated[Path | None, typer.Option("--score", help="Score rows that carry `output`; no model.")] = None,
    ppl: Annotated[list[Path] | None, typer.Option("--ppl", help="Text (.txt/.jsonl) for perplexity. Repeatable.")
                   ] = None,
    ppl_rule: Annotated[str, typer.Option("--ppl-rule", help="rolling (lm-eval) or llama.cpp (second half of chunks).")
                        ] = "rolling",
    ppl_max_length: Annotated[int | None, typer.Option("--ppl-max-length", min=2,
                                                       help="Window length in tokens (default: the model's context).")
                              ] = None,
    speed: Annotated[bool, typer.Option("--speed", help="Load time, prefill/decode tokens/s, peak RSS, size.")] = False,
    speed_runs: Annotated[int, typer.Option("--speed-runs", min=1, help="Timed runs for --speed (median).")] = 5,
    threads: Annotated[int | None, typer.Option("--threads", min=1,
                                                help="CPU threads for torch (default: torch's choice).")] = None,
    output: Output = None,
    summary: Annotated[Path | None, typer.Option("--summary", help="Write the per-model summary as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of accuracy against size.")] = None,
    fail_under: Annotated[float | None, typer.Option("--fail-under", min=0.0, max=1.0,
                                                     help="Exit 3 when a model's accuracy is below this.")] = None,
    force: Force = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Generation budget per task.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")] = 16,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N tasks.")] = None,
    code_timeout: Annotated[float, typer.Option("--code-timeout", min=0.1, help="Seconds per code program.")] = 5.0,
    code_memory_mb: Annotated[int, typer.Option("--code-memory-mb", min=64, help="Memory per code program (MB).")
                              ] = 512,
) -> None:
    from orstack.bench.runner import BenchConfig

    models = models or []
    config = BenchConfig(models=models, tasks=str(tasks) if tasks else None, ppl=[str(p) for p in ppl or []],
                         ppl_rule=ppl_rule, ppl_max_length=ppl_max_length, speed=speed, speed_runs=speed_runs,
                         threads=threads, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
                         fail_under=fail_under)
    _check_usage(config, score, output, summary, plot)
    if score is not None:
        rows, summaries = _score_mode(score, code_timeout, code_memory_mb)
    else:
        rows, summaries = _bench_mode(config, code_timeout, code_memory_mb)
    _report(summaries)
    failure = _gate_failure(summaries, fail_under)
    if failure and not force:
        raise GateFailed(f"{failure}; nothing written (--force writes the results and still exits 3)")
    if rows:
        from orstack.io.jsonl import write_jsonl

        write_jsonl(rows, output)
    if summary is not None:
        from orstack.io.jsonl import write_json
        from orstack.io.manifest import as_args

        write_json({"config": as_args(config), "models": summaries}, summary)
    if plot is not None:
        from orstack.bench.report import plot_accuracy_vs_size

        plot_accuracy_vs_size(summaries, plot)
    if failure:
        raise GateFailed(failure)


def _check_usage(config, score: Path | None, output: Path | None, summary: Path | None,  # noqa: ANN001
                 plot: Path | None) -> None:
    """Every check that needs no model, before anything heavy is imported or loaded."""
    from orstack.backends.perplexity import RULES

    if score is not None and (config.models or config.tasks or config.ppl or config.speed):
        raise BadInput("--score scores existing outputs: give no MODEL, --tasks, --ppl or --speed with it")
    if score is None and not config.models:
        raise BadInput("no MODEL given (or use --score ROWS.jsonl)")
    if config.ppl_rule not in RULES:
        raise BadInput(f"--ppl-rule: expected {' or '.join(RULES)}, got '{config.ppl_rule}'")
    if config.fail_under is not None and not (config.tasks or score):
        raise BadInput("--fail-under needs --tasks or --score (it gates task accuracy)")
    if plot is not None and not config.tasks:
        raise BadInput("--plot needs --tasks (it plots task accuracy against size)")
    for spec in config.models:
        _check_model(spec)
    if score is None and not (config.tasks or config.ppl or config.speed):
        raise BadInput("nothing to measure: give --tasks, --ppl and/or --speed")
    for path in (output, summary, plot):
        if path is not None and str(path) != "-" and not path.resolve().parent.is_dir():
            raise BadInput(f"{path}: output directory {path.parent} does not exist")


def _check_model(spec: str) -> None:
    if spec.lower().endswith(".gguf"):
        if not Path(spec).is_file():
            raise BadInput(f"{spec}: no such GGUF file")
        return
    from orstack.io.checkpoint import resolve_checkpoint

    resolve_checkpoint(spec)


def _bench_mode(config, code_timeout: float, code_memory_mb: int) -> tuple[list[dict], list[dict]]:  # noqa: ANN001
    from orstack.bench.runner import bench_model
    from orstack.io.text import read_texts
    from orstack.tasks.contract import load_tasks
    from orstack.tasks.sandbox import Limits, Sandbox

    task_rows = load_tasks(config.tasks, config.limit) if config.tasks else None
    texts = list(read_texts(config.ppl)) if config.ppl else None
    if config.ppl and not any(texts):
        raise BadInput(f"{', '.join(config.ppl)}: no text to measure perplexity on")
    needs_sandbox = bool(task_rows) and any(t["kind"] == "code" for t in task_rows)
    sandbox = Sandbox(limits=Limits(timeout=code_timeout, memory_mb=code_memory_mb)) if needs_sandbox else None
    rows, summaries = [], []
    try:
        for spec in config.models:
            model_rows, model_summary = bench_model(spec, config, task_rows, texts, runtime=current_runtime(), sandbox=sandbox)
            rows.extend(model_rows)
            summaries.append(model_summary)
    finally:
        if sandbox is not None:
            sandbox.close()
    return rows, summaries


def _score_mode(path: Path, code_timeout: float, code_memory_mb: int) -> tuple[list[dict], list[dict]]:
    from orstack.bench.report import lineage
    from orstack.tasks.results import accuracy_summary, load_scored_rows, rescore
    from orstack.tasks.sandbox import Limits, Sandbox

    rows = load_scored_rows(path)
    with Sandbox(limits=Limits(timeout=code_timeout, memory_mb=code_memory_mb)) as sandbox:
        scored = rescore(rows, sandbox) if any(r["kind"] == "code" for r in rows) else rescore(rows)
    by_model: dict[str, list[dict]] = {}
    for row in scored:
        by_model.setdefault(str(row.get("model", path.name)), []).append(row)
    summaries = [{"model": m, "lineage": lineage(m), **accuracy_summary(r)} for m, r in by_model.items()]
    return scored, summaries


def _report(summaries: list[dict]) -> None:
    from orstack.bench.report import comparison_table, lineage_line

    console.table(comparison_table(summaries))
    for s in summaries:
        if "ppl" in s:
            console.info(f"{s['model']}: perplexity {s['ppl']['ppl']:.4f} over {s['ppl']['tokens']} tokens, "
                         f"{s['ppl']['bits_per_byte']:.4f} bits/byte ({s['ppl']['rule']} rule)")
        console.info(f"{s['model']} lineage: {lineage_line(s.get('lineage', []))}")


def _gate_failure(summaries: list[dict], fail_under: float | None) -> str | None:
    if fail_under is None:
        return None
    below = [f"{s['model']} {s['accuracy'] if s.get('accuracy') is None else round(s['accuracy'], 4)}"
             for s in summaries if s.get("accuracy") is None or s["accuracy"] < fail_under]
    return f"accuracy below --fail-under {fail_under}: {', '.join(below)}" if below else None


def register(app: typer.Typer) -> None:
    app.command("bench", help=HELP)(bench)
