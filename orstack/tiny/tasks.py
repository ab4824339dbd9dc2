"""Verifiable synthetic task families: the curriculum the tiny default is trained on.

Seven families, four difficulty levels each. Every generator takes a `random.Random`
and returns (prompt, answer); answers are computed with Python's own arithmetic and
string functions, so they are correct by construction.

    add/sub   operands of 1..4 digits         `12+345=` -> `357`, `345-12=` -> `333`
    mul       1x1, 2x1, 2x2, 3x2 digits       `12*7=` -> `84`
    reverse   3..10 letters                   `rev abc=` -> `cba`
    sort      3..10 letters                   `sort dcab=` -> `abcd`
    copy      3..10 letters                   `copy abc=` -> `abc`
    compare   two numbers of 1..4 digits      `cmp 17 9=` -> `>`
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from typing import Any

LEVELS = (1, 2, 3, 4)
LETTERS = string.ascii_lowercase
# String lengths per level: 3-4, 5-6, 7-8, 9-10.
STRING_LENGTHS = {1: (3, 4), 2: (5, 6), 3: (7, 8), 4: (9, 10)}
# (digits of a, digits of b) per multiplication level.
MUL_DIGITS = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2)}
# The task keywords: the only multi-character tokens of the tiny tokenizer.
KEYWORDS = ("rev ", "sort ", "copy ", "cmp ")


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0-9 for one digit)."""
    if digits == 1:
        return rng.randrange(10)
    return rng.randrange(10 ** (digits - 1), 10**digits)


def _letters(rng: random.Random, level: int) -> str:
    lo, hi = STRING_LENGTHS[level]
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def gen_add(rng: random.Random, level: int) -> tuple[str, str]:
    a, b = _number(rng, level), _number(rng, level)
    return f"{a}+{b}=", str(a + b)


def gen_sub(rng: random.Random, level: int) -> tuple[str, str]:
    # The larger operand first: answers are never negative.
    a, b = sorted((_number(rng, level), _number(rng, level)), reverse=True)
    return f"{a}-{b}=", str(a - b)


def gen_mul(rng: random.Random, level: int) -> tuple[str, str]:
    da, db = MUL_DIGITS[level]
    a, b = _number(rng, da), _number(rng, db)
    return f"{a}*{b}=", str(a * b)


def gen_reverse(rng: random.Random, level: int) -> tuple[str, str]:
    s = _letters(rng, level)
    return f"rev {s}=", s[::-1]


def gen_sort(rng: random.Random, level: int) -> tuple[str, str]:
    s = _letters(rng, level)
    return f"sort {s}=", "".join(sorted(s))


def gen_copy(rng: random.Random, level: int) -> tuple[str, str]:
    s = _letters(rng, level)
    return f"copy {s}=", s


def gen_compare(rng: random.Random, level: int) -> tuple[str, str]:
    a, b = _number(rng, level), _number(rng, level)
    if rng.random() < 0.1:  # equal pairs are otherwise too rare to learn at higher levels
        b = a
    return f"cmp {a} {b}=", ">" if a > b else "<" if a < b else "="


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "add": gen_add,
    "sub": gen_sub,
    "mul": gen_mul,
    "reverse": gen_reverse,
    "sort": gen_sort,
    "copy": gen_copy,
    "compare": gen_compare,
}
FAMILIES = tuple(GENERATORS)
KIND = {"add": "numeric", "sub": "numeric", "mul": "numeric"}  # the rest are "exact"
DOMAIN = {"add": "math", "sub": "math", "mul": "math", "compare": "math"}  # the rest are "string"
CELLS = tuple((family, level) for family in FAMILIES for level in LEVELS)


def prompt_space(family: str, level: int) -> int | None:
    """How many distinct prompts a cell has, when small enough to matter (else None)."""
    if family in ("add", "mul", "compare") and level == 1:
        return 100
    if family == "sub" and level == 1:
        return 55
    return None


def task_row(family: str, level: int, prompt: str, answer: str, row_id: str) -> dict[str, Any]:
    """A row in the Task contract (DESIGN.md) with the generator's family and level."""
    return {
        "id": row_id,
        "prompt": prompt,
        "answer": answer,
        "kind": KIND.get(family, "exact"),
        "domain": DOMAIN.get(family, "string"),
        "family": family,
        "level": level,
    }


def heldout_counts(n: int) -> dict[tuple[str, int], int]:
    """Spread `n` held-out rows evenly over the cells, never taking more than a quarter of a
    small cell's prompts (so training still sees most one-digit sums, say)."""
    caps = {cell: (space // 4 if (space := prompt_space(*cell)) else n) for cell in CELLS}
    counts = dict.fromkeys(CELLS, 0)
    remaining = n
    while remaining > 0:
        open_cells = [c for c in CELLS if counts[c] < caps[c]]
        if not open_cells:
            break
        for cell in open_cells:
            if remaining == 0:
                break
            counts[cell] += 1
            remaining -= 1
    return counts


def make_heldout(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` held-out rows over all families and levels, distinct prompts, deterministic."""
    rng = random.Random(f"orstack-tiny-heldout-{seed}")
    rows = []
    for (family, level), count in heldout_counts(n).items():
        seen: set[str] = set()
        while len(seen) < count:
            prompt, answer = GENERATORS[family](rng, level)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(task_row(family, level, prompt, answer, f"{family}-{level}-h{len(seen) - 1:04d}"))
    return rows


def training_stream(seed: int, exclude: set[str]) -> Iterator[tuple[str, int, str, str]]:
    """An endless stream of (family, level, prompt, answer), uniform over cells, that never
    yields a prompt in `exclude` (the held-out prompts)."""
    rng = random.Random(f"orstack-tiny-train-{seed}")
    while True:
        family, level = CELLS[rng.randrange(len(CELLS))]
        prompt, answer = GENERATORS[family](rng, level)
        if prompt not in exclude:
            yield family, level, prompt, answer


def make_train_rows(n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """`n` rows from the training distribution (never a held-out prompt), in the Task contract.

    They come from their own stream (not the one the model was trained on), so they are a
    fair sample of the training distribution for later stages (rl, distill)."""
    rows = []
    per_cell: dict[tuple[str, int], int] = {}
    for family, level, prompt, answer in training_stream(seed + 1_000_003, exclude):
        if len(rows) >= n:
            break
        i = per_cell.get((family, level), 0)
        per_cell[(family, level)] = i + 1
        rows.append(task_row(family, level, prompt, answer, f"{family}-{level}-t{i:04d}"))
    return rows


def as_text(rows: list[dict[str, Any]]) -> str:
    """Rows as plain text, one `prompt+answer` line each, exactly as the model saw them."""
    return "".join(f"{r['prompt']}{r['answer']}\n" for r in rows)
