"""Tasks in, Result rows out (the Result contract, orstack/tasks/contract.py), through any backend.

Shared by bench, route and the teachers' callers: generation (or choice log-likelihoods)
in batches that share stop sequences and budget, then scoring by the task's verifier.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.io.jsonl import display_name, read_jsonl_numbered
from orstack.tasks.contract import RESULT_FIELDS, RESULT_ORDER, prompt_of, validate_task, where_is
from orstack.tasks.passk import pass_at_k_by_task
from orstack.tasks.stops import stop_sequences
from orstack.tasks.verify import choice_continuations, pick_choice, run_code, score_outputs

if TYPE_CHECKING:
    from orstack.backends.base import Backend, Generation
    from orstack.tasks.sandbox import Sandbox


def run_tasks(backend: Backend, tasks: Sequence[dict[str, Any]], *, max_new_tokens: int = 32,
              batch_size: int = 16, sandbox: Sandbox | None = None) -> list[dict[str, Any]]:
    """Generate (or score choices) for every task and score it; rows in task order."""
    from orstack.console import progress as progress_bar

    outputs: dict[int, tuple[str, Generation | None]] = {}
    extras: dict[int, dict[str, Any]] = defaultdict(dict)
    generated = [i for i, t in enumerate(tasks) if t["kind"] != "choice"]
    chosen = [i for i, t in enumerate(tasks) if t["kind"] == "choice"]
    with progress_bar() as bar:
        job = bar.add_task(f"bench {backend.name}", total=len(tasks), unit="tasks")
        for batch in _generation_batches(tasks, generated, batch_size):
            stop = stop_sequences(tasks[batch[0]])
            new_tokens = int(tasks[batch[0]].get("max_new_tokens", max_new_tokens))
            gens = backend.generate([prompt_of(tasks[i]) for i in batch], max_new_tokens=new_tokens, stop=stop)
            for i, gen in zip(batch, gens):
                outputs[i] = (gen.text, gen)
            bar.advance(job, len(batch))
        for start in range(0, len(chosen), batch_size):
            batch = chosen[start : start + batch_size]
            _score_choices(backend, tasks, batch, outputs, extras)
            bar.advance(job, len(batch))
    ordered = [outputs[i][0] for i in range(len(tasks))]
    rows = [result_row(task, backend.name, outputs[i][0], outputs[i][1]) | extras[i] for i, task in enumerate(tasks)]
    score_rows(rows, tasks, ordered, sandbox)
    for i, (_, gen) in outputs.items():
        error = (gen.error if gen is not None else None) or extras[i].get("error")
        if error:  # no answer came (an endpoint's request failed, with keep_going): not scored
            rows[i].update(output=None, correct=None, score=None, error=error)
    return rows


def _generation_batches(tasks: Sequence[dict], indices: list[int], batch_size: int) -> list[list[int]]:
    """Batches of tasks that share stop sequences and token budget, similar prompt lengths together."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in indices:
        groups[(tuple(stop_sequences(tasks[i])), tasks[i].get("max_new_tokens"))].append(i)
    batches = []
    for members in groups.values():
        members.sort(key=lambda i: len(str(prompt_of(tasks[i]))))
        batches.extend(members[s : s + batch_size] for s in range(0, len(members), batch_size))
    return batches


def _score_choices(backend: Backend, tasks: Sequence[dict], batch: list[int],
                   outputs: dict[int, tuple[str, Generation | None]], extras: dict[int, dict]) -> None:
    contexts, continuations, owners = [], [], []
    for i in batch:
        for cont in choice_continuations(tasks[i]):
            contexts.append(prompt_of(tasks[i]))
            continuations.append(cont)
            owners.append(i)
    began = time.perf_counter()
    scores = backend.loglikelihoods(contexts, continuations)
    per_task_ms = (time.perf_counter() - began) * 1000 / len(batch)
    by_task: dict[int, list[float]] = defaultdict(list)
    for i, s in zip(owners, scores):
        by_task[i].append(s)
    for i in batch:
        if any(math.isnan(s) for s in by_task[i]):  # a choice's request failed (an endpoint, with keep_going)
            outputs[i] = ("", None)
            extras[i] = {"error": "endpoint: a choice's log-likelihood request failed"}
            continue
        best, _ = pick_choice(tasks[i], by_task[i])
        outputs[i] = (tasks[i]["choices"][best], None)
        extras[i] = {"choice_loglikelihoods": by_task[i], "latency_ms": per_task_ms}


def result_row(task: dict[str, Any], model: str, output: str, gen: Generation | None) -> dict[str, Any]:
    """One row of the Result contract: its leading fields in RESULT_ORDER (unset ones None), then
    the task's other fields (family, level, ...). Result fields a task carries from an earlier
    answer (a Result row used as a task) are not this answer's, so they are dropped."""
    logprobs = gen.token_logprobs if gen else []
    entropies = gen.token_entropies if gen else []
    values = {
        "id": task["id"], "model": model, "prompt": task.get("prompt"), "output": output,
        "answer": task.get("answer"), "kind": task["kind"], "domain": task.get("domain"),
        "prompt_tokens": gen.prompt_tokens if gen else None,
        "output_tokens": gen.output_tokens if gen else None,
        "mean_logprob": _finite(sum(logprobs) / len(logprobs)) if logprobs else None,
        "min_logprob": _finite(min(logprobs)) if logprobs else None,
        "mean_entropy": _finite(sum(entropies) / len(entropies)) if entropies else None,
        "latency_ms": round(gen.latency_ms, 3) if gen else None,
    }
    row = {k: values.get(k) for k in RESULT_ORDER}
    row.update({k: v for k, v in task.items() if k not in row and k not in RESULT_FIELDS})
    return row


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no -inf


def score_rows(rows: list[dict[str, Any]], tasks: Sequence[dict[str, Any]], outputs: Sequence[str],
               sandbox: Sandbox | None = None) -> None:
    """Fill `correct`, `score` (and `error` for code that did not pass) in place."""
    code = [i for i, t in enumerate(tasks) if t["kind"] == "code"]
    plain = [i for i, t in enumerate(tasks) if t["kind"] != "code"]
    for i, (ok, score) in zip(plain, score_outputs([tasks[i] for i in plain], [outputs[i] for i in plain])):
        rows[i]["correct"], rows[i]["score"] = ok, score
    if code:
        runs = run_code([tasks[i] for i in code], [outputs[i] for i in code], sandbox)
        for i, run in zip(code, runs):
            rows[i]["correct"], rows[i]["score"] = run.passed, float(run.passed)
            rows[i]["error"] = None if run.passed else f"{run.status}: {run.detail}".rstrip(": ")


def load_scored_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows that already carry `output` (from anywhere), checked like tasks."""
    name = display_name(path)
    rows = []
    for lineno, row in read_jsonl_numbered(path):
        where = f"{name}:{lineno}"
        if row.get("output") is None:
            raise BadInput(f"{where}: missing required field 'output'")
        if not isinstance(row["output"], str):
            raise BadInput(f"{where}: field 'output': expected a string")
        # the prompt is needed only to assemble code programs
        validate_task(row, where, fields=("id", "kind", "prompt") if row.get("kind") == "code" else ("id", "kind"))
        rows.append(row)
    if not rows:
        raise BadInput(f"{name}: no rows")
    return rows


def rescore(rows: list[dict[str, Any]], sandbox: Sandbox | None = None) -> list[dict[str, Any]]:
    """`--score`: the same rules, applied to outputs produced elsewhere; other fields kept."""
    out = [dict(r) for r in rows]
    for r in out:
        r.setdefault("error", None)
    score_rows(out, rows, [r["output"] for r in rows], sandbox)
    return out


def accuracy_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and by kind / family / level / domain, over rows that can be scored."""
    scored = [r for r in rows if r.get("correct") is not None]
    summary: dict[str, Any] = {"tasks": len(rows), "scored": len(scored),
                               "accuracy": _mean(r["correct"] for r in scored)}
    for key in ("kind", "family", "level", "domain"):
        groups: dict[str, list[bool]] = defaultdict(list)
        for r in scored:
            if r.get(key) is not None:
                groups[str(r[key])].append(bool(r["correct"]))
        if len(groups) > 1 or (groups and key in ("family",)):
            summary[f"by_{key}"] = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    clustered = [r for r in scored if r.get("cluster") is not None]
    if clustered:  # tasks of known failure clusters (cluster-failures' annotation), apart
        summary["cluster_accuracy"] = _mean(r["correct"] for r in clustered)
        summary["cluster_tasks"] = len(clustered)
    tokens = [r["output_tokens"] for r in rows if r.get("output_tokens") is not None]
    if tokens:
        summary["mean_output_tokens"] = sum(tokens) / len(tokens)
    code_rows = [r for r in scored if r.get("kind") == "code"]
    if code_rows:
        summary.update(pass_at_k_by_task(code_rows))
    return summary


def _mean(values) -> float | None:  # noqa: ANN001
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None




def fit_prompts(backend: Backend, tasks: Sequence[dict[str, Any]], *, max_new_tokens: int, truncate: bool = False,
                source: str = "tasks") -> tuple[list[dict[str, Any]], int]:
    """(tasks, how many prompts were truncated): every prompt checked against the model's
    context after tokenizing and before anything is generated, so an oversized prompt is
    refused instead of making the model allocate for it. A prompt longer than the context is
    bad input naming the task (`source` names the file), or with `truncate` keeps its end:
    as many tokens as leave room for the answer (the generation budget, at most half the
    context)."""
    check_templates(backend, tasks, source)
    context = backend.context_length()
    if not context:
        return list(tasks), 0
    fitted, truncated = [], 0
    for task in tasks:
        if task.get("messages") is not None:
            n_tokens = len(backend.encode_prompt(task["messages"]))
            if n_tokens > context:
                raise BadInput(f"{where_is(tasks, task, source)}: field 'messages': the conversation has {n_tokens} "
                               f"tokens, more than the context of {backend.name} ({context} tokens); shorten it "
                               "(--truncate-prompts cuts only `prompt` strings)")
            fitted.append(task)
            continue
        n_tokens, exact = _prompt_tokens(backend, task["prompt"], context)
        if n_tokens <= context:
            fitted.append(task)
            continue
        if not truncate:
            counted = (f"the prompt has {n_tokens} tokens" if exact else
                       f"the prompt's first {PROBE_CHARS * (context + 1)} of {len(task['prompt'])} characters "
                       f"alone are {n_tokens} tokens")
            raise BadInput(f"{where_is(tasks, task, source)}: field 'prompt': {counted}, more than the context of "
                           f"{backend.name} ({context} tokens); shorten it or pass --truncate-prompts")
        keep = context - min(_answer_budget(backend, task, max_new_tokens), context // 2)
        fitted.append({**task, "prompt": keep_last_tokens(backend, task["prompt"], keep)})
        truncated += 1
    return fitted, truncated


def check_templates(backend: Backend, tasks: Sequence[dict[str, Any]], source: str = "tasks") -> None:
    """Bad input naming the first task (file:line:field) that needs a chat template the model
    does not have: a `messages` task, or any task under `--chat-template model`."""
    from orstack.backends.chat import no_template_message

    chat = getattr(backend, "chat", None)
    if chat is None or chat.template is not None:
        return
    for task in tasks:
        if chat.wants_template(prompt_of(task)):
            where = where_is(tasks, task, source)
            if task.get("messages") is None:
                raise BadInput(f"{where}: field 'prompt': --chat-template model, but {backend.name} has no chat "
                               "template; pass --chat-template FILE.jinja")
            raise BadInput(no_template_message(backend.name, where))


# A prompt longer than this many characters per token of context is first judged by a prefix
# of that length: a 10 MB prompt is refused in a fraction of a second, not after tokenizing
# all of it (tens of seconds and gigabytes with a fast tokenizer).
PROBE_CHARS = 64


def _prompt_tokens(backend: Backend, prompt: str, context: int) -> tuple[int, bool]:
    """(token count, whether it is exact): a count of a prefix when that alone is too long."""
    probe = PROBE_CHARS * (context + 1)
    if len(prompt) > probe:
        n_tokens = len(backend.encode_prompt(prompt[:probe]))
        if n_tokens > context + 8:  # cutting inside a word changes only the last few tokens
            return n_tokens, False
    return len(backend.encode_prompt(prompt)), True


def _answer_budget(backend: Backend, task: dict[str, Any], max_new_tokens: int) -> int:
    if task["kind"] == "choice":
        return max(len(backend.encode_prompt(c)) for c in choice_continuations(task))
    return int(task.get("max_new_tokens", max_new_tokens))


def keep_last_tokens(backend: Backend, text: str, n_tokens: int) -> str:
    """The longest end of `text` that the model reads as at most `n_tokens` tokens (the cut
    falls between characters, so the text stays valid)."""
    def fits(start: int) -> bool:
        return len(backend.encode_prompt(text[start:])) <= n_tokens

    # Grow a window from the end until it no longer fits, then bisect inside it: only a few
    # tokenizations of about the kept length, however long the text.
    width = max(n_tokens, 1)
    while width < len(text) and fits(len(text) - width):
        width *= 2
    if width >= len(text) and fits(0):
        return text
    low, high = max(len(text) - width, 0), len(text) - width // 2  # fits(high) holds, fits(low) does not
    if not fits(high):
        high = len(text)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return text[high:]
