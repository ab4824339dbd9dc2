"""Stop sequences: the task's own, or the default for its kind, and the one place text is cut at them."""

from __future__ import annotations

from typing import Any

# Stop sequences when a task gives none: answers on one line; code stops where HumanEval's do.
DEFAULT_STOP = {"numeric": ["\n\n"], "exact": ["\n"], "text": ["\n\n"], "choice": [],
                "code": ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```"]}


def stop_sequences(task: dict[str, Any]) -> list[str]:
    """The task's `stop` field when it has one, else the default for its kind."""
    return list(task["stop"]) if "stop" in task else list(DEFAULT_STOP.get(task.get("kind"), []))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """(text up to the earliest stop sequence, whether one was found); the sequence itself is dropped."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)
