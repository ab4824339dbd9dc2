"""`orstack bench`: accuracy, perplexity, speed, memory and size of models, side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import ChatTemplate, Force, Output, current_runtime
from orstack.errors import BadInput, GateFailed

HELP = """Benchmark models: task accuracy, perplexity, speed, memory and size, side by side.

MODEL is a Hugging Face checkpoint directory (every checkpoint orstack writes, including
LoRA adapters, sparse, packed 4-bit and .orz models), a .gguf file (llama.cpp backend) or a
served model, http(s)://HOST:PORT/v1#NAME (OpenAI-compatible: vLLM, llama.cpp's server,
SGLang, hosted APIs; several servers of one model as URL,URL#NAME, spread by load): prompts
go to /completions and conversations to /chat/completions, --concurrency at a time, with
--timeout, --retries and --rate-limit, logprobs requested for the signal fields, choice tasks
scored from echoed prompt logprobs. A request that still fails exits 2 with nothing written,
or with --keep-going leaves an `error` on that row (unscored).
Tasks (JSONL: id, prompt, kind, answer/choices/tests) are answered greedily in batches and
scored by kind: numeric (last number, tolerance), exact (normalised match), choice
(highest log-likelihood choice) or code (run against `tests` in a sandboxed worker pool
with time and memory limits, no network, writes confined to a throw-away directory).
A prompt longer than the model's context is refused (naming the task), or with
--truncate-prompts cut from the left to leave room for the answer (the count is reported).
One Result row per task per model goes to standard output (or -o); a side-by-side table
with deltas against the first model, and each model's lineage (from its orstack.json, a
.gguf file's metadata or a .orz pack), goes to standard error.

A task may ask with `messages` (a conversation: [{role, content}], roles system, user,
assistant) instead of `prompt`: it goes through the model's chat template (generation prompt
on, stopping at the template's end-of-turn token). `prompt` tasks are fed as-is unless
--chat-template is given: `model` (the model's own template) or a .jinja file.

--ppl-answers measures the perplexity of each task's answer tokens given its prompt (numeric
and exact tasks; one pooled figure): the measure that means something for a model trained
on answers only, whose text perplexity on random prompts does not.

--score ROWS.jsonl scores rows that already carry `output` by the same rules, without a model.
--fail-under ACC exits 3 (writing nothing unless --force) when a model's accuracy is below ACC;
--fail-under DOMAIN=ACC (repeatable) gates the accuracy on the tasks of one domain.

With two or more models, each is compared with the first on the same tasks: the accuracy
difference in points with a 95% paired bootstrap interval (seeded by --seed), McNemar's exact
p-value and the tasks that flipped each way, overall, per domain and per cluster (rows
annotated by cluster-failures); with --ppl, the mean KL divergence of its next-token
distributions from the first model's (n/a, with the reason, for another vocabulary or
tokenization). --max-regression PTS exits 3 when a model is more than PTS points below the
first and McNemar's p is below --alpha.

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
    ppl_answers: Annotated[bool, typer.Option("--ppl-answers",
                                              help="Perplexity of each task's answer tokens given its prompt.")
                           ] = False,
    speed: Annotated[bool, typer.Option("--speed", help="Load time, prefill/decode tokens/s, peak RSS, size.")] = False,
    speed_runs: Annotated[int, typer.Option("--speed-runs", min=1, help="Timed runs for --speed (median).")] = 5,
    threads: Annotated[int | None, typer.Option("--threads", min=1,
                                                help="CPU threads for torch (default: torch's choice).")] = None,
    output: Output = None,
    summary: Annotated[Path | None, typer.Option("--summary", help="Write the per-model summary as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of accuracy against size.")] = None,
    fail_under: Annotated[list[str] | None, typer.Option("--fail-under", metavar="[DOMAIN=]ACC",
                                                         help="Exit 3 when a model's accuracy (in DOMAIN) is below "
                                                              "ACC. Repeatable.")] = None,
    max_regression: Annotated[float | None, typer.Option("--max-regression", metavar="PTS", min=0.0, max=100.0,
                                                         help="Exit 3 when a model is more than PTS accuracy points "
                                                              "below the first, significantly (--alpha).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0,
                                         help="Significance level for --max-regression (McNemar's exact test).")
                     ] = 0.05,
    force: Force = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Generation budget per task.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")] = 16,
    gguf_batch: Annotated[int, typer.Option("--gguf-batch", min=1,
                                            help="GGUF models: prompts llama.cpp decodes at once, sharing their "
                                                 "common prefix (1: one at a time, the reference; more is faster, "
                                                 "but llama.cpp's quantized kernels round a batch differently, so "
                                                 "a near-tied answer can change).")] = 1,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N tasks.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", metavar="I/N",
                                              help="Only the I-th (from 0) of N contiguous blocks of the tasks; "
                                                   "the N outputs concatenated are the whole run's.")] = None,
    truncate_prompts: Annotated[bool, typer.Option("--truncate-prompts",
                                                   help="Cut prompts longer than the context from the left "
                                                        "(default: refuse them).")] = False,
    code_timeout: Annotated[float, typer.Option("--code-timeout", min=0.1, help="Seconds per code program.")] = 5.0,
    code_memory_mb: Annotated[int, typer.Option("--code-memory-mb", min=64, help="Memory per code program (MB).")
                              ] = 512,
    chat_template: ChatTemplate = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Teacher SPEC grading `text` outputs 1-10 "
                                              "(correct at --judge-min or above).")] = None,
    judge_min: Annotated[float, typer.Option("--judge-min", min=1.0, max=10.0, help="Lowest passing judge score.")
                         ] = 7.0,
    judge_rubric: Annotated[Path | None, typer.Option("--judge-rubric", help="Rubric file with {question} and "
                                                      "{response} (default: orstack's).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.01, help="Endpoint models: seconds per request.")
                       ] = 60.0,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Endpoint models: retries per request.")] = 3,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Endpoint models: requests in flight.")
                           ] = 4,
    rate_limit: Annotated[float | None, typer.Option("--rate-limit", min=0.001,
                                                     help="Endpoint models: requests per second.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Variable holding the endpoint's API key.")
                           ] = "OPENAI_API_KEY",
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Endpoint models: a request that fails for good "
                                                                   "is an error on its row, not the end of the run.")
                          ] = False,
) -> None:
    from orstack.backends.endpoint import EndpointOptions
    from orstack.bench import BenchConfig, BenchOutputs
    from orstack.bench import run as run_bench
    from orstack.bench import score as score_rows

    runtime = current_runtime()
    if threads is not None:  # bench's own --threads overrides the global one
        runtime = dataclasses.replace(runtime, threads=threads)
    config = BenchConfig(tasks=str(tasks) if tasks else None, ppl=[str(p) for p in ppl or []], ppl_rule=ppl_rule,
                         ppl_max_length=ppl_max_length, ppl_answers=ppl_answers, speed=speed, speed_runs=speed_runs,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, gguf_batch=gguf_batch, limit=limit,
                         shard=shard,
                         truncate_prompts=truncate_prompts, fail_under=list(fail_under or []),
                         max_regression=max_regression, alpha=alpha, code_timeout=code_timeout,
                         code_memory_mb=code_memory_mb, chat_template=chat_template, seed=runtime.seed,
                         judge=_judge_config(judge, judge_min, judge_rubric),
                         endpoint=EndpointOptions(concurrency=concurrency, timeout=timeout, retries=retries,
                                                  rate_limit=rate_limit, api_key_env=api_key_env,
                                                  keep_going=keep_going))
    outputs = BenchOutputs(rows=output, summary=summary, plot=plot)
    if score is not None:
        if models:
            raise BadInput("--score scores existing outputs: give no MODEL, --tasks, --ppl or --speed with it")
        result = score_rows(score, config, runtime, outputs)
    else:
        result = run_bench(models or [], config, runtime, outputs)
    _report(result.summaries, result.comparisons)
    if result.failure and not force:
        raise GateFailed(f"{result.failure}; nothing written (--force writes the results and still exits 3)")
    _write(result, outputs)
    if result.failure:
        raise GateFailed(result.failure)


def _write(result, outputs) -> None:  # noqa: ANN001 - BenchResult, BenchOutputs
    from orstack.io.jsonl import write_json, write_jsonl

    if result.rows:
        write_jsonl(result.rows, outputs.rows)
    if outputs.summary is not None:
        write_json(result.summary_json(), outputs.summary)
    if outputs.plot is not None:
        from orstack.bench.report import plot_accuracy_vs_size

        plot_accuracy_vs_size(result.summaries, outputs.plot)


def _report(summaries: list[dict], comparisons: list[dict]) -> None:
    from orstack.bench.compare import kl_notes, statistics_tables
    from orstack.bench.report import comparison_table, lineage_line

    console.table(comparison_table(summaries, width=console.stderr().width))
    for tbl in statistics_tables(comparisons):
        console.table(tbl)
    for note in kl_notes(comparisons):
        console.info(note)
    confinement = next((s["sandbox"] for s in summaries if "sandbox" in s), None)
    if confinement:
        console.info(f"sandbox: {confinement}")
    for s in summaries:
        if "ppl" in s:
            console.info(f"{s['model']}: perplexity {s['ppl']['ppl']:.4f} over {s['ppl']['tokens']} tokens, "
                         f"{s['ppl']['bits_per_byte']:.4f} bits/byte ({s['ppl']['rule']} rule)")
        if "ppl_answers" in s:
            console.info(f"{s['model']}: answer perplexity {s['ppl_answers']['ppl']:.4f} over "
                         f"{s['ppl_answers']['tokens']} answer tokens")
        if "truncated_prompts" in s:
            context = f"its context of {s['context_length']} tokens" if s["context_length"] else "its context"
            console.info(f"{s['model']}: {s['truncated_prompts']} prompt(s) truncated from the left to fit {context}")
        console.info(f"{s['model']} lineage: {lineage_line(s.get('lineage', []))}")


def _judge_config(spec: str | None, min_score: float, rubric: Path | None):  # noqa: ANN202 - JudgeConfig | None
    from orstack.teachers.judge import JudgeConfig

    return JudgeConfig(spec, min_score=min_score, rubric=str(rubric) if rubric else None) if spec else None


def register(app: typer.Typer) -> None:
    app.command("bench", help=HELP)(bench)
