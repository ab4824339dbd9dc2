"""One `orstack bench` run: every model asked for tasks, perplexity and speed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.tasks.results import accuracy_summary, run_tasks

if TYPE_CHECKING:
    from orstack.backends.base import Backend
    from orstack.runtime import Runtime
    from orstack.tasks.sandbox import Sandbox


@dataclass
class BenchConfig:
    """Everything one `orstack bench` run depends on."""

    models: list[str] = field(default_factory=list)
    tasks: str | None = None
    ppl: list[str] = field(default_factory=list)
    ppl_rule: str = "rolling"
    ppl_max_length: int | None = None
    speed: bool = False
    speed_runs: int = 5
    max_new_tokens: int = 32
    batch_size: int = 16
    limit: int | None = None
    fail_under: float | None = None
    threads: int | None = None  # torch CPU threads (None: torch's default)


def bench_model(spec: str, config: BenchConfig, tasks: Sequence[dict[str, Any]] | None = None,
                texts: Sequence[str] | None = None, *, runtime: Runtime,
                sandbox: Sandbox | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Everything asked of one model: (Result rows, summary)."""
    from orstack.backends.base import open_backend
    from orstack.bench.report import lineage
    from orstack.bench.speed import measure_speed, peak_rss_mb, reset_peak_rss, rss_mb

    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    _import_runtime(spec)
    reset_peak_rss()
    rss_before = rss_mb()
    began = time.perf_counter()
    backend = open_backend(spec, runtime, batch_size=config.batch_size)
    load_s = time.perf_counter() - began
    try:
        summary: dict[str, Any] = {"model": spec, "lineage": lineage(spec)}
        rows: list[dict[str, Any]] = []
        if tasks:
            began = time.perf_counter()
            rows = run_tasks(backend, tasks, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                             sandbox=sandbox)
            summary["tasks_per_s"] = len(tasks) / (time.perf_counter() - began)
            summary.update(accuracy_summary(rows))
        if texts:
            max_length = config.ppl_max_length or min(context_length(backend) or 2048, 2048)
            try:
                result = backend.perplexity(list(texts), max_length=max_length, rule=config.ppl_rule)
            except ValueError as e:  # e.g. a text shorter than one llama.cpp-rule chunk
                raise BadInput(f"--ppl: {e}") from None
            summary["ppl"] = result.as_dict()
        size = backend.size_bytes()
        summary["size_mb"] = size / 1e6
        if config.speed:
            speed = measure_speed(backend, runs=config.speed_runs, max_positions=context_length(backend))
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
        if str(spec).lower().endswith(".gguf"):
            import llama_cpp  # noqa: F401
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

            from orstack.io.checkpoint import load_config

            AutoModelForCausalLM._model_mapping[type(load_config(spec))]  # imports the modeling module
    except Exception:  # noqa: BLE001 - open_backend reports whatever is wrong with the model
        pass


def context_length(backend: Backend) -> int | None:
    """The model's trained context in tokens, when the backend tells."""
    n_ctx = getattr(backend, "n_ctx_train", None)  # llama.cpp
    config = getattr(getattr(backend, "model", None), "config", None)  # transformers
    return n_ctx or getattr(config, "max_position_embeddings", None)
