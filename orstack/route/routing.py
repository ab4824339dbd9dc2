"""`route run`: answer with the resident base, escalate unconfident answers.

The accurate path is a LoRA modifier for the task's domain, hot-swapped on the resident
base (peft adapters are loaded once and switched by name, the base weights never reload),
or a separate accurate model. `--vote N` samples N answers on the accurate path (through
`Backend.sample`) and takes the majority, with the agreement as its confidence. Any backend
serves as base or accurate model; modifiers need a transformers base (a peft adapter API).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.route.router import Router
from orstack.tasks.contract import prompt_of

if TYPE_CHECKING:
    from orstack.runtime import Runtime

MODES = ("auto", "fast", "accurate")


@dataclass
class RouteRunConfig:
    """Every option that changes what `route run` answers."""

    base: str
    router: str | None = None
    modifiers: dict[str, str] = field(default_factory=dict)  # domain -> LoRA adapter directory
    accurate: str | None = None
    mode: str = "auto"
    vote: int = 1
    vote_temperature: float = 0.7
    max_new_tokens: int = 32
    batch_size: int = 16
    compare: bool = False
    chat_template: str | None = None  # None: `messages` tasks only; "model" or a .jinja path: every task
    seed: int = 0  # the votes' sampling seed


def is_gguf(spec: str | None) -> bool:
    return spec is not None and str(spec).lower().endswith(".gguf")


def parse_modifiers(specs: list[str]) -> dict[str, str]:
    """DOMAIN=ADAPTER pairs as given on the command line."""
    modifiers = {}
    for spec in specs:
        domain, sep, path = spec.partition("=")
        if not sep or not domain or not path:
            raise BadInput(f"--modifier {spec!r}: expected DOMAIN=ADAPTER_DIR")
        modifiers[domain] = path
    return modifiers


def check_plan(config: RouteRunConfig, router: Router | None, tasks: list[dict]) -> None:
    """Everything that can be wrong is found before any model loads."""
    if config.mode not in MODES:
        raise BadInput(f"--mode {config.mode!r}: use one of {', '.join(MODES)}")
    if config.mode == "auto" and router is None:
        raise BadInput("--mode auto needs --router (or use --mode fast / --mode accurate)")
    if config.vote < 1:
        raise BadInput("--vote must be at least 1")
    for domain, path in config.modifiers.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise BadInput(f"--modifier {domain}={path}: {path} is not a LoRA adapter directory "
                           "(no adapter_config.json)")
    if config.modifiers and is_gguf(config.base):
        raise BadInput(f"--modifier needs a transformers base to hot-swap LoRA adapters on; --base {config.base} "
                       "is a GGUF file (use --accurate MODEL instead)")
    if router is not None:
        unknown = sorted(set(config.modifiers) - set(router.featurizer.domains))
        if unknown and router.featurizer.domains:
            raise BadInput(f"--modifier: unknown domain '{unknown[0]}' "
                           f"(the router knows: {', '.join(router.featurizer.domains)})")
        check_router_base(router, config.base)
    if config.mode != "fast" and config.accurate is None:
        missing = sorted({str(t.get("domain")) for t in tasks} - set(config.modifiers))
        if missing:
            raise BadInput(f"no accurate path for domain '{missing[0]}': give --modifier {missing[0]}=ADAPTER "
                           "or --accurate MODEL")


def check_router_base(router: Router, base: str) -> None:
    from orstack.io.manifest import weights_digest

    expected = router.base.get("sha256")
    if expected and Path(base).exists() and weights_digest(base) != expected:
        raise BadInput(f"router was trained on results of {router.base.get('model')}, "
                       f"whose weights differ from --base {base}")


class AccuratePaths:
    """Modifiers hot-swapped on the resident base, or a separate accurate model."""

    def __init__(self, base_backend, modifiers: dict[str, str], accurate: str | None, batch_size: int,
                 runtime: Runtime, chat_template: str | None = None) -> None:
        self.base = base_backend
        self.modifiers = modifiers
        self.loaded: list[str] = []
        self.accurate_backend = None
        self.accurate_spec = accurate
        self.batch_size = batch_size
        self.runtime = runtime
        self.chat_template = chat_template

    def backend_for(self, domain: str):
        """(backend, path label) for a task of `domain`."""
        if domain in self.modifiers:
            self._activate(domain)
            return self.base, f"modifier:{domain}"
        if self.accurate_backend is None:
            from orstack.backends.base import open_backend

            self.accurate_backend = open_backend(self.accurate_spec, self.runtime, batch_size=self.batch_size,
                                                 chat_template=self.chat_template)
        return self.accurate_backend, "accurate"

    def _activate(self, domain: str) -> None:
        # The adapter API belongs to transformers models (peft); check_plan refuses modifiers elsewhere.
        if not self.loaded:
            from peft import PeftModel

            self.base.model = PeftModel.from_pretrained(self.base.model, self.modifiers[domain], adapter_name=domain)
            self.base.model.eval()
        elif domain not in self.loaded:
            self.base.model.load_adapter(self.modifiers[domain], adapter_name=domain)
        if domain not in self.loaded:
            self.loaded.append(domain)
        self.base.model.set_adapter(domain)

    def fast(self):
        """The base with every adapter switched off (the very same weights in memory)."""
        return _AdaptersOff(self.base)

    def close(self) -> None:
        if self.accurate_backend is not None:
            self.accurate_backend.close()


class _AdaptersOff:
    def __init__(self, backend) -> None:
        self.backend = backend
        self.context = None

    def __enter__(self):
        model = getattr(self.backend, "model", None)  # a transformers model; llama.cpp has no adapters here
        if hasattr(model, "disable_adapter"):
            self.context = model.disable_adapter()
            self.context.__enter__()
        return self.backend

    def __exit__(self, *exc) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


def answer_key(task: dict, text: str) -> str:
    """What two answers must share to count as the same vote."""
    from orstack.tasks.verify import last_number, normalize

    if task.get("kind") == "numeric":
        value = last_number(text)
        return "" if value is None else repr(value)
    return normalize(text)


def vote_answers(backend, tasks: list[dict], n: int, temperature: float, max_new_tokens: int, seed: int) -> list[dict]:
    """Self-consistency: n sampled answers per task (unfiltered, tempered sampling), the
    majority answer and its agreement. One seeded `sample` call draws for every task; each
    answer is then cut at its own task's stop sequences."""
    from orstack.backends.base import Sampling
    from orstack.tasks.stops import cut_at_stop, stop_sequences

    sampling = Sampling(temperature=temperature, top_p=1.0, top_k=0, n=n, seed=seed)
    draws = backend.sample([prompt_of(t) for t in tasks], max_new_tokens=max_new_tokens, stop=[], sampling=sampling)
    voted = []
    for task, generations in zip(tasks, draws):
        stops = stop_sequences(task)
        texts = [cut_at_stop(g.text, stops)[0] for g in generations]
        keys = [answer_key(task, t) for t in texts]
        winner, votes = Counter(keys).most_common(1)[0]
        voted.append({"output": texts[keys.index(winner)], "agreement": votes / n})
    return voted


def route_tasks(config: RouteRunConfig, router: Router | None, tasks: list[dict], runtime: Runtime,
                ) -> tuple[list, dict]:
    """Result rows with a `route` field, and a summary of the run."""
    from orstack.backends.base import open_backend
    from orstack.tasks.results import fit_prompts, run_tasks, score_rows

    base = open_backend(config.base, runtime, batch_size=config.batch_size, chat_template=config.chat_template)
    fit_prompts(base, tasks, max_new_tokens=config.max_new_tokens)  # a prompt beyond the context is refused
    paths = AccuratePaths(base, config.modifiers, config.accurate, config.batch_size, runtime, config.chat_template)
    started = time.perf_counter()
    with paths.fast() as backend:
        fast_rows = run_tasks(backend, tasks, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    fast_seconds = time.perf_counter() - started
    decisions = []
    for row in fast_rows:
        if config.mode == "auto":
            p, escalate, ms = router.decide(row)
        else:
            p, escalate, ms = None, config.mode == "accurate", 0.0
        decisions.append((p, escalate, ms))
    # --compare runs the accurate path on every task, to report always-accurate beside the router
    to_run = range(len(tasks)) if config.compare else [i for i, (_, esc, _) in enumerate(decisions) if esc]
    accurate_rows: dict[int, dict] = {}
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i in to_run:
        by_domain[str(tasks[i].get("domain"))].append(i)
    accurate_seconds = 0.0
    for domain, indices in sorted(by_domain.items()):
        backend, label = paths.backend_for(domain)
        subset = [tasks[i] for i in indices]
        began = time.perf_counter()
        rows = run_tasks(backend, subset, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        if config.vote > 1:
            voted = vote_answers(backend, subset, config.vote, config.vote_temperature, config.max_new_tokens,
                                 config.seed)
            for row, v in zip(rows, voted):
                row["output"], row["vote_agreement"] = v["output"], v["agreement"]
            score_rows(rows, subset, [r["output"] for r in rows])
        accurate_seconds += time.perf_counter() - began
        for i, row in zip(indices, rows):
            row["route_path"] = label
            accurate_rows[i] = row
    out = []
    for i, (p, escalate, ms) in enumerate(decisions):
        row = dict(accurate_rows[i]) if escalate else dict(fast_rows[i])
        path = row.pop("route_path", "fast") if escalate else "fast"
        row["route"] = {"mode": config.mode, "path": path, "modifier": path.split(":", 1)[1] if ":" in path else None,
                        "p_base_ok": p, "threshold": router.threshold if router else None,
                        "decision_ms": round(ms, 4)}
        out.append(row)
    summary = summarise(out, fast_rows, accurate_rows if config.compare else None, fast_seconds, accurate_seconds)
    paths.close()
    base.close()
    return out, summary


def summarise(rows: list[dict], fast_rows: list[dict], all_accurate: dict[int, dict] | None,
              fast_seconds: float, accurate_seconds: float) -> dict[str, Any]:
    def accuracy(items) -> float:
        items = list(items)
        return sum(bool(r.get("correct")) for r in items) / max(len(items), 1)

    escalated = [r for r in rows if r["route"]["path"] != "fast"]
    summary = {
        "tasks": len(rows),
        "accuracy": accuracy(rows),
        "accurate_share": len(escalated) / max(len(rows), 1),
        "always_fast_accuracy": accuracy(fast_rows),
        "mean_latency_ms": {"fast": 1000 * fast_seconds / max(len(rows), 1),
                            "accurate": 1000 * accurate_seconds / max(len(escalated), 1) if escalated else None},
        "mean_decision_ms": sum(r["route"]["decision_ms"] for r in rows) / max(len(rows), 1),
    }
    if all_accurate is not None:
        summary["always_accurate_accuracy"] = accuracy(all_accurate.values())
    return summary
