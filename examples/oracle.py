"""A `cmd:` teacher that solves the tiny default's task families exactly, from the prompt alone.

Reads Task JSONL on stdin (orstack hides `answer` from teachers), writes {"id", "response"}.
For a new-problem request (`request: "variant"`, with `example`) it writes a new problem of the
same family and size as the example, and its answer, as `Problem: ...\\nAnswer: ...`.

    orstack distill generate --failures failures.jsonl --teacher "cmd:python examples/oracle.py" -o t.jsonl
"""

from __future__ import annotations

import json
import random
import re
import string
import sys

ARITH = re.compile(r"^(\d+)([+\-*])(\d+)=$")
WORD = re.compile(r"^(rev|sort|copy) ([a-z]+)=$")
CMP = re.compile(r"^cmp (\d+) (\d+)=$")


def solve(prompt: str) -> str | None:
    if m := ARITH.match(prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b if op == "-" else a * b)
    if m := WORD.match(prompt):
        s = m[2]
        return s[::-1] if m[1] == "rev" else "".join(sorted(s)) if m[1] == "sort" else s
    if m := CMP.match(prompt):
        a, b = int(m[1]), int(m[2])
        return ">" if a > b else "<" if a < b else "="
    return None


def number_like(text: str, rng: random.Random) -> str:
    """A random number with as many digits as `text`."""
    if len(text) == 1:
        return str(rng.randrange(10))
    return str(rng.randrange(10 ** (len(text) - 1), 10 ** len(text)))


def variant(example: str, rng: random.Random) -> str | None:
    """A new problem shaped like `example` (same family, same operand sizes)."""
    if m := ARITH.match(example):
        a, b = number_like(m[1], rng), number_like(m[3], rng)
        if m[2] == "-" and int(a) < int(b):
            a, b = b, a
        return f"{a}{m[2]}{b}="
    if m := WORD.match(example):
        return f"{m[1]} {''.join(rng.choice(string.ascii_lowercase) for _ in m[2])}="
    if m := CMP.match(example):
        return f"cmp {number_like(m[1], rng)} {number_like(m[2], rng)}="
    return None


def main() -> None:
    for line in sys.stdin:
        task = json.loads(line)
        if task.get("request") == "variant":
            rng = random.Random(f"{task['id']}")
            problem = variant(task["example"]["prompt"], rng)
            response = f"Problem: {problem}\nAnswer: {solve(problem)}" if problem else "cannot"
        else:
            answer = solve(task["prompt"])
            response = answer if answer is not None else "cannot"
        print(json.dumps({"id": task["id"], "response": response}))


if __name__ == "__main__":
    main()
