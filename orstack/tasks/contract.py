"""The Task and Result contracts (docs/design.md): their fields, kinds and checks.

A Task is what a model is asked (bench, rl, distill, route read them); a Result row is a
Task answered by one model (bench writes them; cluster-failures, distill and route read
them). Unknown fields are kept by every stage.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orstack.errors import BadInput

KINDS = ("numeric", "exact", "choice", "code", "text")
REQUIRED = {"numeric": ("answer",), "exact": ("answer",), "choice": ("choices", "answer"),
            "code": ("tests",), "text": ()}
# The fields a Result row adds to its Task: what one model made of it, not part of the problem.
RESULT_FIELDS = ("model", "output", "correct", "score", "prompt_tokens", "output_tokens", "mean_logprob",
                 "min_logprob", "mean_entropy", "latency_ms", "error", "choice_loglikelihoods", "route", "judge_score")
# The order of a Result row's leading fields (the task's other fields follow).
RESULT_ORDER = ("id", "model", "prompt", "output", "answer", "correct", "score", "kind", "domain",
                "prompt_tokens", "output_tokens", "mean_logprob", "min_logprob", "mean_entropy",
                "latency_ms", "error")
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def parse_number(text: str) -> float | None:
    match = NUMBER.fullmatch(text.strip())
    return float(match.group().replace(",", "")) if match else None


def answer_index(task: dict[str, Any]) -> int:
    """The index of the right choice: `answer` is an index or the text of a choice."""
    answer, choices = task["answer"], task["choices"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        raise ValueError(f"index {answer} is out of range for {len(choices)} choices")
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    raise ValueError(f"'{answer}' is neither a choice nor a choice index")


def infer_kind(task: dict[str, Any]) -> str:
    """The task's own kind, else one read off its fields: tests -> code, a numeric answer ->
    numeric, another answer -> exact, no answer -> text."""
    if task.get("kind"):
        return str(task["kind"])
    if task.get("tests"):
        return "code"
    if task.get("answer") is None:
        return "text"
    return "numeric" if parse_number(str(task["answer"])) is not None else "exact"


def is_verifiable(task: dict[str, Any]) -> bool:
    """Whether a verifier can judge an answer to this task (code needs tests, others an answer)."""
    kind = task["kind"]
    if kind == "code":
        return bool(task.get("tests"))
    return kind != "text" and task.get("answer") is not None


def as_task(row: dict[str, Any]) -> dict[str, Any]:
    """A Result row back as a Task: the result fields dropped, every other field kept."""
    task = {k: v for k, v in row.items() if k not in RESULT_FIELDS}
    task["kind"] = infer_kind(task)
    return task


ROLES = ("system", "user", "assistant")


def validate_messages(messages: Any, where: str, field: str = "messages") -> None:
    """A conversation in the OpenAI chat format: a non-empty list of {role, content} objects,
    roles system (first only), user, assistant, each content a non-empty string."""
    if not isinstance(messages, list):
        raise BadInput(f"{where}: field '{field}': expected a list of {{role, content}} objects, "
                       f"got {type(messages).__name__}")
    if not messages:
        raise BadInput(f"{where}: field '{field}': empty conversation (give at least one user turn)")
    for i, message in enumerate(messages):
        at = f"{where}: field '{field}[{i}]'"
        if not isinstance(message, dict):
            raise BadInput(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise BadInput(f"{at}.role: unknown role {role!r} (use {', '.join(ROLES)})")
        if role == "system" and i > 0:
            raise BadInput(f"{at}.role: a system turn may only come first")
        content = message.get("content")
        if not isinstance(content, str) or not content:
            got = "an empty string" if content == "" else type(content).__name__
            raise BadInput(f"{at}.content: expected a non-empty string, got {got}")
    if all(m["role"] == "system" for m in messages):
        raise BadInput(f"{where}: field '{field}': no user or assistant turn")


def prompt_of(task: dict[str, Any]) -> str | list[dict[str, Any]]:
    """What the model is asked: the task's `messages` (a conversation) or its `prompt` (a string)."""
    return task["messages"] if task.get("messages") is not None else task["prompt"]


def text_of(task: dict[str, Any]) -> str:
    """The task's question as plain text (a conversation's turns joined by newlines), for features
    and near-duplicate checks that read text."""
    messages = task.get("messages")
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return str(task.get("prompt") or "")


def validate_task(task: dict[str, Any], where: str, fields: Sequence[str] = ("id", "prompt", "kind")) -> None:
    """Bad input (naming file:line and field) when a task cannot be run or scored. A task asks
    with exactly one of `prompt` (a string) or `messages` (a conversation)."""
    has_messages = task.get("messages") is not None
    if has_messages and task.get("prompt") is not None:
        raise BadInput(f"{where}: fields 'prompt' and 'messages': give exactly one of them")
    if "messages" in task:
        validate_messages(task["messages"], where)
    for field in fields:
        if field == "prompt" and has_messages:
            continue
        if task.get(field) is None:
            hint = " (or 'messages')" if field == "prompt" else ""
            raise BadInput(f"{where}: missing required field '{field}'{hint}")
    if task.get("prompt") is not None and not isinstance(task["prompt"], str):
        raise BadInput(f"{where}: field 'prompt': expected a string, got {type(task['prompt']).__name__}")
    if "id" in task and (isinstance(task["id"], bool) or not isinstance(task["id"], (str, int))):
        raise BadInput(f"{where}: field 'id': expected a string or an integer")
    kind = task["kind"]
    if kind not in KINDS:
        raise BadInput(f"{where}: field 'kind': unknown kind '{kind}' (use {', '.join(KINDS)})")
    for field in REQUIRED[kind]:
        if task.get(field) is None:
            raise BadInput(f"{where}: missing required field '{field}' (needed by kind '{kind}')")
    if kind == "numeric" and parse_number(str(task["answer"])) is None:
        raise BadInput(f"{where}: field 'answer': '{task['answer']}' is not a number")
    if kind == "code" and not isinstance(task["tests"], str):
        raise BadInput(f"{where}: field 'tests': expected a string")
    if kind == "choice":
        choices = task["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise BadInput(f"{where}: field 'choices': expected a list of at least two strings")
        try:
            answer_index(task)
        except ValueError as e:
            raise BadInput(f"{where}: field 'answer': {e}") from None
    budget = task.get("max_new_tokens")
    if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool) and budget > 0):
        raise BadInput(f"{where}: field 'max_new_tokens': expected a positive integer")
    if "stop" in task and not (isinstance(task["stop"], list) and all(isinstance(s, str) for s in task["stop"])):
        raise BadInput(f"{where}: field 'stop': expected a list of strings")


class TaskList(list):
    """Tasks read from a file, remembering where each came from, so that a problem found later
    (a prompt longer than the model's context, say) is reported as file:line."""

    def __init__(self, tasks: Sequence[dict[str, Any]] = (), source: str = "tasks",
                 lines: dict[Any, int] | None = None) -> None:
        super().__init__(tasks)
        self.source = source
        self.lines = lines or {}

    def where(self, task: dict[str, Any]) -> str:
        line = self.lines.get(task.get("id"))
        return f"{self.source}:{line}" if line is not None else f"{self.source}: task {task.get('id')!r}"


def where_is(tasks: Sequence[dict[str, Any]], task: dict[str, Any], source: str = "tasks") -> str:
    """file:line of a task when its list remembers it, else the source and the task's id."""
    return tasks.where(task) if isinstance(tasks, TaskList) else f"{source}: task {task.get('id')!r}"


def load_tasks(path: str | Path, limit: int | None = None) -> TaskList:
    """Read and check every task before any model is loaded (errors name file:line:field)."""
    from orstack.io.jsonl import display_name, read_jsonl_numbered

    name = display_name(path)
    tasks = TaskList(source=name)
    first_line = tasks.lines
    for lineno, task in read_jsonl_numbered(path):
        where = f"{name}:{lineno}"
        validate_task(task, where)
        if task["id"] in first_line:
            raise BadInput(f"{where}: field 'id': duplicate id {task['id']!r} (first on line {first_line[task['id']]})")
        first_line[task["id"]] = lineno
        tasks.append(task)
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise BadInput(f"{name}: no tasks")
    return tasks
