"""The verifiers on hand-made cases (pure functions; code runs in the sandbox)."""

from __future__ import annotations

import pytest

from orstack.errors import BadInput
from orstack.tasks.contract import validate_task
from orstack.tasks.passk import pass_at_k_by_task
from orstack.tasks.verify import (
    code_program,
    extract_code,
    last_number,
    normalize,
    pick_choice,
    score_output,
    score_outputs,
)


def num(answer, **extra):
    return {"id": "n", "prompt": "p", "kind": "numeric", "answer": answer, **extra}


@pytest.mark.parametrize(("output", "answer", "correct"), [
    ("42", "42", True),
    ("The answer is 42.", "42", True),
    ("7 + 35 = 42", 42, True),
    ("first 42, then 41", "42", False),  # the last number counts
    ("-17", "-17", True),
    ("1,234", "1234", True),
    ("3.50", "3.5", True),
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", True),  # within the default tolerance
    ("no number here", "0", False),
    ("", "0", False),
    ("42e0", "42", True),
    ("4.2", "42", False),
])
def test_numeric(output, answer, correct):
    assert score_output(num(answer), output) == (correct, float(correct))


def test_numeric_tolerance_from_task():
    assert score_output(num("3.14159", tolerance=0.01), "about 3.14")[0]
    assert not score_output(num("3.14159"), "about 3.14")[0]


def test_last_number():
    assert last_number("a 1 b -2.5 c") == -2.5
    assert last_number("x") is None


@pytest.mark.parametrize(("output", "answer", "correct", "ignore_case"), [
    ("cba", "cba", True, False),
    ("  cba\n", "cba", True, False),
    ("cba.", "cba", True, False),
    ("c  b a", "c b a", True, False),
    ("CBA", "cba", False, False),
    ("CBA", "cba", True, True),
    ("cb", "cba", False, False),
    ("ｃｂａ", "cba", True, False),  # NFKC folds full-width letters
])
def test_exact(output, answer, correct, ignore_case):
    task = {"id": "e", "prompt": "p", "kind": "exact", "answer": answer, "ignore_case": ignore_case}
    assert score_output(task, output)[0] is correct


def test_normalize_keeps_case_by_default():
    assert normalize(" Abc  D. ") == "Abc D"


def test_choice_picks_highest_loglikelihood_and_accepts_index_or_text():
    by_text = {"id": "c", "prompt": "p", "kind": "choice", "choices": ["a", "b", "c"], "answer": "b"}
    by_index = {**by_text, "answer": 1}
    assert pick_choice(by_text, [-3.0, -1.0, -2.0]) == (1, True)
    assert pick_choice(by_index, [-0.5, -1.0, -2.0]) == (0, False)
    assert pick_choice(by_index, [-1.0, -1.0, -2.0]) == (0, False)  # ties go to the first choice
    assert score_output(by_index, "b") == (True, 1.0)
    assert score_output(by_text, "c") == (False, 0.0)


def test_text_tasks_are_not_scored():
    assert score_output({"id": "t", "prompt": "p", "kind": "text"}, "anything") == (None, None)


def test_code_program_layouts():
    completion_task = {"id": "k", "prompt": "def add(a, b):\n", "kind": "code", "entry_point": "add",
                       "tests": "assert add(1, 2) == 3"}
    program = code_program(completion_task, "    return a + b\n")
    assert program.startswith("def add(a, b):\n    return a + b\n") and "assert add(1, 2) == 3" in program
    # a full function in a fenced block replaces the prompt
    fenced = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert code_program(completion_task, fenced).startswith("def add(a, b):\n    return a + b\n\n\nassert")
    humaneval = {**completion_task, "tests": "def check(candidate):\n    assert candidate(2, 2) == 4\n"}
    assert code_program(humaneval, "    return a + b\n").rstrip().endswith("check(add)")
    assert extract_code("no fence") == "no fence"


def test_code_scoring_runs_in_the_sandbox():
    task = {"id": "k", "prompt": "def add(a, b):\n", "kind": "code", "entry_point": "add",
            "tests": "assert add(1, 2) == 3", "timeout": 1}
    outputs = ["    return a + b\n", "    return a - b\n", "    while True: pass\n", "    return (\n"]
    scored = score_outputs([task] * 4, outputs)
    assert scored == [(True, 1.0), (False, 0.0), (False, 0.0), (False, 0.0)]


@pytest.mark.parametrize(("task", "message"), [
    ({"prompt": "p", "kind": "exact", "answer": "a"}, "missing required field 'id'"),
    ({"id": "x", "kind": "exact", "answer": "a"}, "missing required field 'prompt'"),
    ({"id": "x", "prompt": "p", "answer": "a"}, "missing required field 'kind'"),
    ({"id": "x", "prompt": "p", "kind": "essay", "answer": "a"}, "unknown kind 'essay'"),
    ({"id": "x", "prompt": "p", "kind": "exact"}, "missing required field 'answer'"),
    ({"id": "x", "prompt": "p", "kind": "numeric", "answer": "forty"}, "is not a number"),
    ({"id": "x", "prompt": "p", "kind": "choice", "choices": ["a"], "answer": "a"}, "at least two"),
    ({"id": "x", "prompt": "p", "kind": "choice", "choices": ["a", "b"], "answer": "c"}, "neither a choice"),
    ({"id": "x", "prompt": "p", "kind": "choice", "choices": ["a", "b"], "answer": 5}, "out of range"),
    ({"id": "x", "prompt": "p", "kind": "code"}, "missing required field 'tests'"),
    ({"id": "x", "prompt": "p", "kind": "exact", "answer": "a", "stop": "\n"}, "field 'stop'"),
    ({"id": "x", "prompt": "p", "kind": "exact", "answer": "a", "max_new_tokens": 0}, "field 'max_new_tokens'"),
])
def test_invalid_tasks_name_the_line_and_field(task, message):
    with pytest.raises(BadInput, match=message) as e:
        validate_task(task, "tasks.jsonl:7")
    assert str(e.value).startswith("tasks.jsonl:7: ")


def test_pass_at_k_by_task_groups_samples_by_id():
    rows = [{"id": "a", "correct": c} for c in (True, False, False, False)]
    rows += [{"id": "b", "correct": c} for c in (False, False, False, False)]
    got = pass_at_k_by_task(rows, ks=(1, 2, 5))
    assert got == pytest.approx({"pass@1": 0.125, "pass@2": 0.25})
