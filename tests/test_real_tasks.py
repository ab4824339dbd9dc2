"""The real-model task suite (orstack/tasks/suites.py): deterministic, disjoint halves, every
question answered exactly by the oracle and judged correct by bench's verifiers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orstack.tasks import suites
from orstack.tasks.contract import validate_messages
from orstack.tasks.verify import score_outputs

ROOT = Path(__file__).resolve().parent.parent
FAKE_HUMANEVAL = [
    {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n",
     "canonical_solution": f"    return x + {i}\n", "entry_point": f"f{i}",
     "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n"}
    for i in range(6)
]


def user_text(task: dict) -> str:
    return next(m["content"] for m in task["messages"] if m["role"] == "user")


def test_same_config_same_suite_and_seed_changes_it():
    config = suites.SuiteConfig(per_cell=3, humaneval=2)
    first = suites.make_suite(config, FAKE_HUMANEVAL)
    assert first == suites.make_suite(config, FAKE_HUMANEVAL)
    other = suites.make_suite(suites.SuiteConfig(per_cell=3, humaneval=2, seed=1), FAKE_HUMANEVAL)
    assert [user_text(t) for t in other[0]] != [user_text(t) for t in first[0]]


def test_halves_are_disjoint_and_cover_every_cell():
    a, b = suites.make_suite(suites.SuiteConfig(per_cell=4, humaneval=3), FAKE_HUMANEVAL)
    assert not {user_text(t) for t in a} & {user_text(t) for t in b}
    assert not {t["id"] for t in a} & {t["id"] for t in b}
    assert len({t["id"] for t in a}) == len(a)
    cells = {(f.name, level) for f in suites.FAMILIES for level in suites.LEVELS}
    for half in (a, b):
        counts = {c: sum(1 for t in half if (t["family"], t["level"]) == c) for c in cells}
        assert set(counts.values()) == {4}
        assert sum(t["kind"] == "code" for t in half) == 3
    assert {t["id"] for t in a if t["kind"] == "code"} == {"HumanEval/0", "HumanEval/2", "HumanEval/4"}


def test_tasks_keep_the_contract():
    a, _ = suites.make_suite(suites.SuiteConfig(per_cell=1, humaneval=1), FAKE_HUMANEVAL)
    for task in a:
        validate_messages(task["messages"], "suite")
        assert "prompt" not in task
        assert task["kind"] in ("numeric", "exact", "code")
        assert task["max_new_tokens"] > 0


def test_oracle_answers_verify_and_a_wrong_answer_does_not():
    a, b = suites.make_suite(suites.SuiteConfig(per_cell=3, humaneval=2), FAKE_HUMANEVAL)
    tasks = a + b
    outputs = [suites.humaneval_solution(user_text(t), FAKE_HUMANEVAL) if t["kind"] == "code"
               else suites.solve(user_text(t)) for t in tasks]
    assert all(o is not None for o in outputs)
    assert all(ok for ok, _ in score_outputs(tasks, outputs))
    # the verifiers do judge: a plausible wrong answer (a chatty or off-by-one one) fails
    wrong = [("    return None\n" if t["kind"] == "code" else
              str(int(o) + 1) if t["kind"] == "numeric" else f"The answer is {o}.")
             for t, o in zip(tasks, outputs)]
    assert not any(ok for ok, _ in score_outputs(tasks, wrong))


def test_solve_does_not_guess():
    assert suites.solve("What is the capital of France?") is None
    assert suites.solve("What is 12 + 30? Answer with just the number.") == "42"


def test_unknown_family_and_too_many_questions_are_refused():
    with pytest.raises(ValueError, match="unknown families"):
        suites.make_suite(suites.SuiteConfig(families=("add", "nope")), [])
    with pytest.raises(ValueError, match="distinct questions"):
        suites.make_suite(suites.SuiteConfig(per_cell=60, families=("upper",), humaneval=0), [])


def test_example_scripts_write_the_suite_and_the_oracle_answers_it(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cmd = [sys.executable, str(ROOT / "examples" / "real_tasks.py"), "--a", str(a), "--b", str(b),
           "--per-cell", "1", "--humaneval", "0", "--corpus", str(tmp_path / "suite.txt")]
    subprocess.run(cmd, check=True, capture_output=True)
    first = a.read_bytes()
    subprocess.run(cmd, check=True, capture_output=True)
    assert a.read_bytes() == first  # regenerated identically
    tasks = [json.loads(line) for line in a.read_text().splitlines()]
    hidden = "".join(json.dumps({k: v for k, v in t.items() if k != "answer"}) + "\n" for t in tasks)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "real_oracle.py")], input=hidden, text=True,
                          check=True, capture_output=True)
    answers = {r["id"]: r["response"] for r in map(json.loads, done.stdout.splitlines())}
    assert all(ok for ok, _ in score_outputs(tasks, [answers[t["id"]] for t in tasks]))
    assert "Repeat exactly this text" in (tmp_path / "suite.txt").read_text()


def test_chat_failures_cluster_on_what_was_asked():
    from orstack.cluster_failures.embed import row_text

    a, _ = suites.make_suite(suites.SuiteConfig(per_cell=1, humaneval=0), [])
    row = {**a[0], "prompt": None, "output": "The answer is 3."}
    assert row_text(row, ["prompt", "output"], "x") == user_text(a[0]) + "\nThe answer is 3."
