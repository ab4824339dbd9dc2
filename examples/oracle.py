#!/usr/bin/env python3
"""An exact teacher for the tiny default's task families, usable as `--teacher cmd:...`.

Reads Task JSONL on stdin and writes each row back with a `response` field: the worked
answer computed by Python. Any program that does this can be an orstack teacher.

    orstack distill generate --failures annotated.jsonl --teacher "cmd:python examples/oracle.py" -o train.jsonl
"""

from __future__ import annotations

import json
import re
import sys

PATTERNS = [
    (re.compile(r"^(\d+)\+(\d+)=$"), lambda a, b: str(int(a) + int(b))),
    (re.compile(r"^(\d+)-(\d+)=$"), lambda a, b: str(int(a) - int(b))),
    (re.compile(r"^(\d+)\*(\d+)=$"), lambda a, b: str(int(a) * int(b))),
    (re.compile(r"^rev ([a-z]+)=$"), lambda s: s[::-1]),
    (re.compile(r"^sort ([a-z]+)=$"), lambda s: "".join(sorted(s))),
    (re.compile(r"^copy ([a-z]+)=$"), lambda s: s),
    (re.compile(r"^cmp (\d+) (\d+)=$"), lambda a, b: ">" if int(a) > int(b) else "<" if int(a) < int(b) else "="),
]


def solve(prompt: str) -> str | None:
    for pattern, answer in PATTERNS:
        match = pattern.match(prompt.strip())
        if match:
            return answer(*match.groups())
    return None


def main() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        row = json.loads(line)
        response = solve(str(row.get("prompt", "")))
        row["response"] = response if response is not None else ""
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
