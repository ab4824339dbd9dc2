"""Verifiers: whether a model's output answers a task, by the task's `kind`.

Shared by bench, rl (rewards) and distill (verification), so they are plain functions
of (task, output):
- numeric: the last number in the output equals the answer within a tolerance;
- exact: the output equals the answer after normalisation (Unicode NFKC, surrounding
  whitespace and one trailing period dropped, inner whitespace collapsed; case kept
  unless the task sets `ignore_case`);
- choice: the choice with the highest log-likelihood is picked (`pick_choice`, as
  lm-evaluation-harness's `acc`); scoring an output that already names a choice
  compares it with the answer choice;
- code: the program passes the task's `tests`, run in the sandbox (sandbox.py);
- text: not verifiable (correct and score are None).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orstack.tasks.contract import NUMBER, answer_index, parse_number

if TYPE_CHECKING:
    from orstack.tasks.sandbox import RunResult, Sandbox

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
DEFAULT_TOLERANCE = 1e-6


# -- numeric ----------------------------------------------------------------------------------
def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def score_numeric(output: str, answer: Any, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    expected = parse_number(str(answer))
    got = last_number(output)
    if expected is None or got is None:
        return False
    return math.isclose(got, expected, rel_tol=1e-9, abs_tol=tolerance)


# -- exact ------------------------------------------------------------------------------------
def normalize(text: str, ignore_case: bool = False) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    text = text[:-1] if text.endswith(".") else text
    return text.casefold() if ignore_case else text


def score_exact(output: str, answer: Any, ignore_case: bool = False) -> bool:
    return normalize(output, ignore_case) == normalize(str(answer), ignore_case)


# -- choice -----------------------------------------------------------------------------------
def choice_continuations(task: dict[str, Any]) -> list[str]:
    """What each choice is scored as after the prompt (lm-eval's default target delimiter ' ')."""
    delimiter = task.get("target_delimiter", " ")
    return [delimiter + c for c in task["choices"]]


def pick_choice(task: dict[str, Any], loglikelihoods: Sequence[float]) -> tuple[int, bool]:
    """(index picked, correct): the highest-log-likelihood choice, ties to the first."""
    best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    return best, best == answer_index(task)


# -- code -------------------------------------------------------------------------------------
def extract_code(output: str) -> str:
    """The code in a model's output: the first fenced block when there is one, else all of it."""
    match = FENCE.search(output)
    return match.group(1) if match else output


OPEN_FENCE = re.compile(r"```[\w+-]+[ \t]*\n")  # a fence that opens a block in a named language


def code_prefix(task: dict[str, Any]) -> str:
    """What the completion continues: the prompt, or for a conversation the final assistant
    prefill. When the text's last fence opens a block in a named language (lm-eval's
    humaneval_instruct prefill "Here is the completed function:\n```python\n{prompt}\n"),
    the completion continues that block: only the code after the fence's line starts the program."""
    messages = task.get("messages")
    if messages is not None:
        last = messages[-1] if messages else {}
        text = last.get("content", "") if last.get("role") == "assistant" else ""
    else:
        text = task.get("prompt") or ""
    opening = text.rfind("```")
    if opening >= 0 and OPEN_FENCE.match(text, opening):
        return text[text.index("\n", opening) + 1:]
    return text


def code_program(task: dict[str, Any], output: str) -> str:
    """The program to run: the completion (after the prompt unless it defines the entry point
    itself), then the tests, then `check(entry_point)` when the tests define `check`
    (HumanEval's layout)."""
    code = extract_code(output)
    entry = task.get("entry_point")
    defines_entry = bool(entry) and re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE)
    program = code if defines_entry else code_prefix(task) + code
    program += "\n\n" + task["tests"] + "\n"
    if entry and re.search(r"^def\s+check\s*\(", task["tests"], re.MULTILINE):
        program += f"\ncheck({entry})\n"
    return program


_default_sandbox: Sandbox | None = None


def default_sandbox() -> Sandbox:
    """One pool per process, started on first use and closed at exit."""
    global _default_sandbox
    if _default_sandbox is None:
        import atexit

        from orstack.tasks.sandbox import Sandbox

        _default_sandbox = Sandbox()
        atexit.register(_default_sandbox.close, kill=True)  # at exit no result is waited for
    return _default_sandbox


def run_code(tasks: Sequence[dict[str, Any]], outputs: Sequence[str], sandbox: Sandbox | None = None,
             ) -> list[RunResult]:
    """Run each (task, output) program in the sandbox, in parallel; limits from the task
    (`timeout` seconds, `memory_mb`) or the sandbox's defaults."""
    from dataclasses import replace

    sandbox = sandbox or default_sandbox()
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        groups[(task.get("timeout"), task.get("memory_mb"))].append(i)
    results: list[RunResult | None] = [None] * len(tasks)
    for (timeout, memory_mb), indices in groups.items():
        limits = sandbox.limits
        if timeout is not None:
            limits = replace(limits, timeout=float(timeout))
        if memory_mb is not None:
            limits = replace(limits, memory_mb=int(memory_mb))
        programs = [code_program(tasks[i], outputs[i]) for i in indices]
        for i, result in zip(indices, sandbox.run_many(programs, limits)):
            results[i] = result
    return results  # type: ignore[return-value]


# -- one entry point --------------------------------------------------------------------------
def score_output(task: dict[str, Any], output: str) -> tuple[bool | None, float | None]:
    """(correct, score) of `output` for `task`; (None, None) for unverifiable `text` tasks."""
    return score_outputs([task], [output])[0]


def score_outputs(tasks: Sequence[dict[str, Any]], outputs: Sequence[str], sandbox: Sandbox | None = None,
                  ) -> list[tuple[bool | None, float | None]]:
    """score_output for many rows at once (code runs in parallel in the sandbox)."""
    scored: list[tuple[bool | None, float | None]] = [(None, None)] * len(tasks)
    code_rows = [i for i, t in enumerate(tasks) if t["kind"] == "code"]
    for i, task in enumerate(tasks):
        kind, output = task["kind"], outputs[i]
        if kind == "numeric":
            ok = score_numeric(output, task["answer"], float(task.get("tolerance", DEFAULT_TOLERANCE)))
        elif kind in ("exact", "choice"):
            answer = task["choices"][answer_index(task)] if kind == "choice" else task["answer"]
            ok = score_exact(output, answer, bool(task.get("ignore_case", False)))
        else:
            continue
        scored[i] = (ok, float(ok))
    if code_rows:
        runs = run_code([tasks[i] for i in code_rows], [outputs[i] for i in code_rows], sandbox)
        for i, run in zip(code_rows, runs):
            scored[i] = (run.passed, float(run.passed))
    return scored
