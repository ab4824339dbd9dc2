#!/usr/bin/env python3
"""An ORACLE `cmd:` teacher for the real-model suite (orstack/tasks/suites.py): it answers every
question exactly from its text (`suites.solve`) and a HumanEval task with the problem's canonical
solution. It knows the answers; it is not a model. It stands in for a real teacher (a bigger model
behind an endpoint: `--teacher https://HOST/v1#MODEL` replaces it) on a machine with no network.

Reads Task JSONL on stdin (orstack hides `answer` and `tests`), writes {"id", "response"} rows;
an unknown question gets an empty response (the verifier then rejects it). A new-problem request
(`request: "variant"`, `distill generate --per-cluster`) gets a new question of the example's
family and level, drawn by the suite's own generator (`Problem: ...` / `Answer: ...`), seeded by
the request id so a run is reproducible; orstack verifies it by asking for its answer again.

    orstack distill generate --failures failures.jsonl --teacher "cmd:python examples/real_oracle.py" -o t.jsonl
"""

from __future__ import annotations

import json
import random
import sys

from orstack.tasks import suites


def new_problem(request: dict) -> str:
    """A question of the example's family and level, different from the example."""
    example = (request.get("example") or {}).get("prompt") or ""
    family = next((f for f in suites.FAMILIES if f.pattern.search(example)), None)
    level = request.get("level")
    if family is None or level not in suites.LEVELS:
        return ""
    rng = random.Random(f"real-oracle-{request.get('id')}")
    for _ in range(100):
        question, answer = family.make(rng, level)
        if question != example:
            return f"Problem: {question}\nAnswer: {answer}"
    return ""


def main() -> int:
    problems: list[dict] | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
        if task.get("request") == "variant":
            sys.stdout.write(json.dumps({"id": task.get("id"), "response": new_problem(task)}) + "\n")
            continue
        messages = task.get("messages") or []
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), task.get("prompt") or "")
        if task.get("kind") == "code":
            if problems is None:
                problems = suites.humaneval_problems()
            response = suites.humaneval_solution(user, problems) or ""
        else:
            response = suites.solve(user) or ""
        sys.stdout.write(json.dumps({"id": task.get("id"), "response": response}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
