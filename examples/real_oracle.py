#!/usr/bin/env python3
"""An ORACLE `cmd:` teacher for the real-model suite (orstack/tasks/suites.py): it answers every
question exactly from its text (`suites.solve`) and a HumanEval task with the problem's canonical
solution. It knows the answers; it is not a model. It stands in for a real teacher (a bigger model
behind an endpoint: `--teacher https://HOST/v1#MODEL` replaces it) on a machine with no network.

Reads Task JSONL on stdin (orstack hides `answer` and `tests`), writes {"id", "response"} rows;
an unknown question gets an empty response (the verifier then rejects it).

    orstack distill generate --failures failures.jsonl --teacher "cmd:python examples/real_oracle.py" -o t.jsonl
"""

from __future__ import annotations

import json
import sys

from orstack.tasks import suites


def main() -> int:
    problems: list[dict] | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
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
