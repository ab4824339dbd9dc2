"""One `orstack bench` run: check everything, ask every model for tasks, perplexity and speed,
and gate on accuracy (`run`); or score outputs made elsewhere, without a model (`score`).

Both return a BenchResult (Result rows, one summary per model, the gate's verdict); the
command prints it and writes the outputs, which were checked against the output policy
before any work.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.backends.endpoint import EndpointOptions, is_endpoint
from orstack.bench.compare import (
    KLReference,
    check_domains,
    check_gates,
    comparisons,
    gate_failures,
    parse_fail_under,
)
from orstack.errors import BadInput
from orstack.io.output import Output, check_outputs
from orstack.tasks.results import accuracy_summary, fit_prompts, run_tasks
from orstack.teachers.judge import JudgeConfig

if TYPE_CHECKING:
    from orstack.runtime import Runtime
    from orstack.tasks.sandbox import Sandbox


@dataclass
class BenchConfig:
    """Every option that changes what `orstack bench` measures or writes (the models are
    `run`'s argument; device and threads are the Runtime's)."""

    tasks: str | None = None  # task JSONL ('-' for stdin)
    ppl: list[str] = field(default_factory=list)  # perplexity text files
    ppl_rule: str = "rolling"
    ppl_max_length: int | None = None  # None: the model's context, at most 2048
    ppl_answers: bool = False  # perplexity of each task's answer given its prompt (bench/answers.py)
    speed: bool = False
    speed_runs: int = 5
    max_new_tokens: int = 32
    batch_size: int = 16
    gguf_batch: int = 1  # GGUF prompts decoded at once by llama.cpp (1: the batch-invariant reference)
    limit: int | None = None  # only the first N tasks
    shard: str | None = None  # "I/N": only the I-th of N contiguous blocks of the tasks (orstack/tasks/shard.py)
    truncate_prompts: bool = False  # keep the end of a prompt longer than the context, instead of refusing it
    fail_under: list[str] = field(default_factory=list)  # accuracy gates: "ACC" (overall) or "DOMAIN=ACC"
    max_regression: float | None = None  # gate: points a model may fall below the first (when significant)
    alpha: float = 0.05  # significance level for --max-regression (McNemar's exact test)
    code_timeout: float = 5.0  # sandbox seconds per code program (a task's `timeout` wins)
    code_memory_mb: int = 512  # sandbox memory per code program (a task's `memory_mb` wins)
    chat_template: str | None = None  # None: `messages` tasks only; "model" or a .jinja path: every task
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)  # how http(s):// models are asked
    judge: JudgeConfig | None = None  # grades `text` outputs 1-10 (orstack/teachers/judge.py)
    seed: int = 0


@dataclass(frozen=True)
class BenchOutputs:
    """Where the command will write: Result rows (None: standard output), the summary JSON, the plot."""

    rows: str | Path | None = None
    summary: str | Path | None = None
    plot: str | Path | None = None

    def policy(self) -> list[Output]:
        outputs = [Output(self.rows, "file", "-o"), Output(self.summary, "file", "--summary")]
        return outputs + ([Output(self.plot, "file", "--plot")] if self.plot is not None else [])


@dataclass
class BenchResult:
    config: BenchConfig
    rows: list[dict[str, Any]]  # Result rows, every model's in turn
    summaries: list[dict[str, Any]]  # one per model: accuracy, perplexity, speed, size, lineage
    failure: str | None = None  # why an accuracy gate failed (None: passed, or no gate)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # every later model vs the first (compare.py)

    def summary_json(self) -> dict[str, Any]:
        """The --summary file: the whole config (and its class, for config_from_manifest) and
        every model's summary."""
        from orstack.io.manifest import as_args, config_class_name

        return {"config": as_args(self.config), "config_class": config_class_name(self.config),
                "models": self.summaries, "comparisons": self.comparisons}


def run(models: Sequence[str], config: BenchConfig, runtime: Runtime,
        outputs: BenchOutputs = BenchOutputs()) -> BenchResult:  # noqa: B008 - frozen dataclass
    """Benchmark `models` side by side. Every input and output is checked before any model
    is loaded; then each model in turn answers the tasks, scores the perplexity text and is
    timed; the accuracy gate is applied last."""
    from orstack.io.jsonl import display_name
    from orstack.io.text import read_texts
    from orstack.tasks.contract import load_tasks

    models = [str(m) for m in models]
    _check_usage(models, config, outputs)
    check_outputs(outputs.policy(), inputs=[config.tasks, *config.ppl, *models])
    uses_torch = any(not _is_gguf(m) and not is_endpoint(m) for m in models)
    if uses_torch:
        runtime.torch_device()  # --device cuda without CUDA: one line, before any work
    for spec in models:
        _check_model(spec)
    tasks = load_tasks(config.tasks, config.limit) if config.tasks else None
    if tasks is not None:
        check_domains(parse_fail_under(config.fail_under)[1], tasks, display_name(config.tasks))
    if tasks is not None and config.shard is not None:
        tasks = _shard_of(tasks, config)
    if tasks is not None and config.ppl_answers:
        from orstack.bench.answers import check_answer_tasks

        check_answer_tasks(tasks, display_name(config.tasks))
    texts = list(read_texts(config.ppl)) if config.ppl else None
    if config.ppl and not any(texts):
        raise BadInput(f"{', '.join(config.ppl)}: no text to measure perplexity on")

    runtime.apply_threads()
    if uses_torch:  # a GGUF-only run never imports torch (llama.cpp then takes every core)
        from orstack.runtime import seed_everything

        seed_everything(config.seed)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    kl_results: list[dict[str, Any] | None] = []
    judge = _open_judge(config, tasks, runtime)
    with _sandbox_for(tasks, config) as sandbox, tempfile.TemporaryDirectory(prefix="orstack-kl-") as kl_dir:
        kl = KLReference(kl_dir, texts, rule=config.ppl_rule) if texts and len(models) > 1 else None
        try:
            for spec in models:
                model_rows, summary = bench_model(spec, config, tasks, texts, runtime=runtime, sandbox=sandbox,
                                                  kl=kl)
                if judge is not None:
                    _judge(judge, model_rows, summary, display_name(config.tasks))
                kl_results.append(summary.pop("kl", None))
                rows.extend(model_rows)
                summaries.append(summary)
        finally:
            if judge is not None:
                judge.close()
    return _result(config, rows, summaries, models, kl_results)


def _open_judge(config: BenchConfig, tasks: Sequence[dict[str, Any]] | None, runtime: Runtime) -> Any:
    """The --judge, checked (and reachable) before any model loads; None without one."""
    if config.judge is None:
        return None
    if not tasks or not any(t["kind"] == "text" for t in tasks):
        raise BadInput("--judge grades `kind: text` tasks and there are none to grade")
    from orstack.teachers.judge import Judge, check_judge

    check_judge(config.judge)
    judge = Judge(config.judge, runtime)
    judge.check()
    return judge


def _judge(judge: Any, rows: list[dict[str, Any]], summary: dict[str, Any], where: str) -> None:
    """Grade a model's `text` rows (judge_score, score, correct) and recount its accuracy."""
    from orstack.teachers.judge import judge_rows

    judge_rows(judge, rows, rows, where)
    summary.update(accuracy_summary(rows))
    summary["judge"] = {"spec": judge.config.spec, "min_score": judge.config.min_score,
                        "judged": sum(1 for r in rows if "judge_score" in r)}


def _result(config: BenchConfig, rows: list[dict[str, Any]], summaries: list[dict[str, Any]],
            models: Sequence[str], kl_results: Sequence[dict[str, Any] | None] = ()) -> BenchResult:
    """The rows and summaries with the comparisons against the first model, gated."""
    compared = comparisons(rows, models, seed=config.seed, alpha=config.alpha)
    for entry, kl in zip(compared, list(kl_results)[1:]):
        if kl is not None:
            entry["kl"] = kl
    failures = gate_failures(summaries, rows, compared, fail_under=config.fail_under,
                             max_regression=config.max_regression, alpha=config.alpha)
    return BenchResult(config, rows, summaries, "; ".join(failures) or None, compared)


def score(rows_path: str | Path, config: BenchConfig, runtime: Runtime,
          outputs: BenchOutputs = BenchOutputs()) -> BenchResult:  # noqa: B008 - frozen dataclass
    """`--score`: rows that already carry `output` (made anywhere) scored by bench's rules,
    other fields kept; one summary per `model` named in the rows."""
    from orstack.bench.report import lineage
    from orstack.io.jsonl import display_name
    from orstack.tasks.results import load_scored_rows, rescore

    if config.tasks or config.ppl or config.speed:
        raise BadInput("--score scores existing outputs: give no MODEL, --tasks, --ppl or --speed with it")
    if outputs.plot is not None:
        raise BadInput("--plot needs --tasks (it plots task accuracy against size)")
    check_gates(config.fail_under, config.max_regression, config.alpha)
    check_outputs(outputs.policy(), inputs=[rows_path])
    rows = load_scored_rows(rows_path)
    with _sandbox_for(rows, config) as sandbox:
        scored = rescore(rows, sandbox)
    judge = _open_judge(config, scored, runtime)
    if judge is not None:
        try:
            from orstack.teachers.judge import judge_rows

            judge_rows(judge, scored, scored, display_name(rows_path))
        finally:
            judge.close()
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in scored:
        by_model.setdefault(str(row.get("model", Path(rows_path).name)), []).append(row)
    summaries = [{"model": m, "lineage": lineage(m), **accuracy_summary(r)} for m, r in by_model.items()]
    if sandbox is not None:
        for summary in summaries:
            summary["sandbox"] = sandbox.confinement  # what the code ran under
    check_domains(parse_fail_under(config.fail_under)[1], scored, display_name(rows_path))
    if config.max_regression is not None and len(by_model) < 2:
        raise BadInput(f"--max-regression compares models with the first: {rows_path} has rows of one model only")
    return _result(config, scored, summaries, list(by_model))


def _check_usage(models: list[str], config: BenchConfig, outputs: BenchOutputs) -> None:
    """Every check of the options themselves (nothing is read yet)."""
    from orstack.backends.perplexity import RULES

    if not models:
        raise BadInput("no MODEL given (or use --score ROWS.jsonl)")
    if config.ppl_rule not in RULES:
        raise BadInput(f"--ppl-rule: expected {' or '.join(RULES)}, got '{config.ppl_rule}'")
    if config.shard is not None:
        from orstack.tasks.shard import parse_shard

        parse_shard(config.shard)
        if not config.tasks or config.ppl or config.speed:
            raise BadInput("--shard splits --tasks: give --tasks, and measure --ppl and --speed unsharded")
    check_gates(config.fail_under, config.max_regression, config.alpha)
    if config.fail_under and not config.tasks:
        raise BadInput("--fail-under needs --tasks or --score (it gates task accuracy)")
    if config.max_regression is not None and (not config.tasks or len(models) < 2):
        raise BadInput("--max-regression needs --tasks (or --score) and two or more models (it compares each "
                       "with the first)")
    if outputs.plot is not None and not config.tasks:
        raise BadInput("--plot needs --tasks (it plots task accuracy against size)")
    if not (config.tasks or config.ppl or config.speed):
        raise BadInput("nothing to measure: give --tasks, --ppl and/or --speed")
    served = next((m for m in models if is_endpoint(m)), None)
    if config.ppl_answers and not config.tasks:
        raise BadInput("--ppl-answers needs --tasks (it scores each task's answer given its prompt)")
    if config.ppl_answers and config.chat_template is not None:
        raise BadInput("--ppl-answers scores plain prompts: give it without --chat-template")
    if served and (config.ppl or config.ppl_answers or config.speed):
        raise BadInput(f"{served}: --ppl and --speed need the weights (bench them locally); an endpoint's "
                       "throughput is its tasks/s")
    from orstack.backends.chat import template_file_text

    template_file_text(config.chat_template)  # a --chat-template FILE that cannot be used: before any model


def _shard_of(tasks: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
    from orstack.tasks.shard import take_shard

    part = take_shard(tasks, config.shard)
    if not part:
        raise BadInput(f"--shard {config.shard}: no tasks in this shard ({len(tasks)} tasks in all)")
    return part


def _is_gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf")


def _check_model(spec: str) -> None:
    """A model is checked without loading its weights: a GGUF file's header and tensor extents,
    or a checkpoint's weight headers, config and that it is a causal language model."""
    if is_endpoint(spec):
        from orstack.backends.openai import parse_endpoint

        parse_endpoint(spec, "MODEL")  # reachability is checked when it opens
        return
    if spec.startswith("vllm:"):
        from orstack.backends.vllm import check_vllm

        check_vllm(spec)  # vLLM installed and a GPU present; the model itself is vLLM's to find
        return
    if _is_gguf(spec):
        if not Path(spec).is_file():
            raise BadInput(f"{spec}: no such GGUF file")
        from orstack.io.gguf_file import check_gguf

        check_gguf(spec)
        return
    from orstack.io.checkpoint import check_checkpoint

    check_checkpoint(spec)


def _sandbox_for(rows: Sequence[dict[str, Any]] | None, config: BenchConfig) -> Sandbox | nullcontext:
    """A sandbox pool when some row is a code task (closed, and on an error or an interrupt its
    programs killed, when the block ends), else nothing."""
    if not rows or not any(r["kind"] == "code" for r in rows):
        return nullcontext()
    from orstack.tasks.sandbox import Limits, Sandbox

    return Sandbox(limits=Limits(timeout=config.code_timeout, memory_mb=config.code_memory_mb))


def bench_model(spec: str, config: BenchConfig, tasks: Sequence[dict[str, Any]] | None = None,
                texts: Sequence[str] | None = None, *, runtime: Runtime,
                sandbox: Sandbox | None = None, kl: KLReference | None = None,
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Everything asked of one model: (Result rows, summary; with `kl`, the summary's "kl" is the
    model's KL from the first model, which the first records)."""
    from orstack.backends.base import open_backend
    from orstack.bench.report import lineage
    from orstack.bench.speed import measure_speed, peak_rss_mb, reset_peak_rss, rss_mb
    from orstack.io.jsonl import display_name

    _import_runtime(spec)
    reset_peak_rss()
    rss_before = rss_mb()
    began = time.perf_counter()
    backend = open_backend(spec, runtime, batch_size=config.batch_size, gguf_batch=config.gguf_batch,
                           chat_template=config.chat_template,
                           endpoint=config.endpoint)
    load_s = time.perf_counter() - began
    try:
        summary: dict[str, Any] = {"model": spec, "lineage": lineage(spec)}
        if config.chat_template is not None or (tasks and any(t.get("messages") is not None for t in tasks)):
            summary.update(backend.chat.record())
        rows: list[dict[str, Any]] = []
        if tasks:
            asked, truncated = fit_prompts(backend, tasks, max_new_tokens=config.max_new_tokens,
                                           truncate=config.truncate_prompts, source=display_name(config.tasks))
            began = time.perf_counter()
            rows = run_tasks(backend, asked, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                             sandbox=sandbox)
            summary["tasks_per_s"] = len(tasks) / (time.perf_counter() - began)
            if is_endpoint(spec):
                summary["endpoint_errors"] = backend.errors
            if sandbox is not None:
                summary["sandbox"] = sandbox.confinement  # what the model's code ran under
            summary.update(accuracy_summary(rows))
            if config.truncate_prompts:
                summary["truncated_prompts"] = truncated
                summary["context_length"] = backend.context_length()
            if config.ppl_answers:
                from orstack.bench.answers import answer_perplexity

                summary["ppl_answers"] = answer_perplexity(backend, tasks).as_dict()
        if texts:
            max_length = config.ppl_max_length or min(backend.context_length() or 2048, 2048)
            try:
                result = backend.perplexity(list(texts), max_length=max_length, rule=config.ppl_rule)
            except ValueError as e:  # e.g. a text shorter than one llama.cpp-rule chunk
                raise BadInput(f"--ppl: {e}") from None
            summary["ppl"] = result.as_dict()
            if kl is not None:
                summary["kl"] = kl.measure(backend, max_length)
        size = backend.size_bytes()
        summary["size_mb"] = size / 1e6
        if config.speed:
            speed = measure_speed(backend, runs=config.speed_runs, max_positions=backend.context_length())
            import torch

            summary["speed"] = {"load_s": load_s, **speed, "peak_rss_mb": peak_rss_mb(),
                                "rss_before_load_mb": rss_before, "size_bytes": size,
                                "threads": torch.get_num_threads()}
        return rows, summary
    finally:
        backend.close()


def _import_runtime(spec: str) -> None:
    """Import the model runtime before the load clock starts, so the first model's load time
    is not charged with library imports the later ones skip."""
    try:
        if is_endpoint(spec):
            return
        if spec.startswith("vllm:"):
            import vllm  # noqa: F401
        elif _is_gguf(spec):
            import llama_cpp  # noqa: F401
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

            from orstack.io.checkpoint import load_config

            AutoModelForCausalLM._model_mapping[type(load_config(spec))]  # imports the modeling module
    except Exception:  # noqa: BLE001 - open_backend reports whatever is wrong with the model
        pass
