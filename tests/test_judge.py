"""The judge for open answers, and distill generate's per-cluster budget: a `cmd:` judge whose
verdicts are known, so scoring and filtering can be checked exactly."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import run_orstack

from orstack.teachers.judge import parse_score

# A teacher that answers every text task with "good ..." or "poor ..." (alternating by id parity),
# and a judge that gives "good" answers 9 and "poor" ones 5 (or, in bad mode, no number at all).
TEACHER = """
import json, sys
for line in sys.stdin:
    t = json.loads(line)
    n = int(str(t["id"]).split("-")[-1])
    print(json.dumps({"id": t["id"], "response": ("good answer " if n % 2 == 0 else "poor answer ") + t["prompt"]}))
"""
JUDGE = """
import json, sys
bad = len(sys.argv) > 1
for line in sys.stdin:
    t = json.loads(line)
    assert "Question:" in t["prompt"] and t["question"] and "rubric" in t
    verdict = "no idea" if bad else ("Score: 9/10" if t["response"].startswith("good") else "5 - vague")
    print(json.dumps({"id": t["id"], "response": verdict}))
"""


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("reply,score", [("8", 8), ("Score: 8/10", 8), ("10", 10), ("7 - good", 7),
                                         ("score 0.5", None), ("eleven", None), ("", None), ("3.5", None)])
def test_scores_are_read_from_the_reply(reply, score):
    assert parse_score(reply) == score


def _programs(tmp_path):
    teacher, judge = tmp_path / "teacher.py", tmp_path / "judge.py"
    teacher.write_text(TEACHER)
    judge.write_text(JUDGE)
    return f"cmd:{sys.executable} {teacher}", f"cmd:{sys.executable} {judge}"


def _failures(tmp_path, n=6):
    path = tmp_path / "failures.jsonl"
    path.write_text("".join(json.dumps({"id": f"essay-{i}", "prompt": f"Explain topic {i}.", "kind": "text",
                                        "correct": False, "cluster": 0, "cluster_label": "explanations"}) + "\n"
                            for i in range(n)))
    return path


def test_distill_generate_keeps_what_the_judge_scores_high(tmp_path):
    teacher, judge = _programs(tmp_path)
    out = tmp_path / "train.jsonl"
    done = run_orstack("distill", "generate", "--failures", str(_failures(tmp_path)), "--teacher", teacher,
                       "--judge", judge, "-o", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["essay-0", "essay-2", "essay-4"]  # the "good" answers only
    assert all(r["judge_score"] == 9 and r["check"] == "judge" and r["verified"] for r in rows)
    # a lower bar keeps the 5s too
    out2 = tmp_path / "train2.jsonl"
    done = run_orstack("distill", "generate", "--failures", str(_failures(tmp_path)), "--teacher", teacher,
                       "--judge", judge, "--judge-min", "5", "-o", str(out2))
    assert done.returncode == 0 and len(out2.read_text().splitlines()) == 6


def test_a_judge_without_a_score_is_one_line_exit_2(tmp_path):
    teacher, judge = _programs(tmp_path)
    out = tmp_path / "train.jsonl"
    done = run_orstack("distill", "generate", "--failures", str(_failures(tmp_path)), "--teacher", teacher,
                       "--judge", judge + " bad", "-o", str(out))
    assert done.returncode == 2 and one_line(done.stderr), done.stderr
    assert "task 'essay-0'" in done.stderr and "no score from 1 to 10" in done.stderr
    assert not out.exists()
    done = run_orstack("distill", "generate", "--failures", str(_failures(tmp_path)), "--teacher", teacher,
                       "--judge", str(tmp_path / "missing"), "-o", str(out))
    assert done.returncode == 2 and "--judge" in done.stderr and one_line(done.stderr) and not out.exists()


def test_per_cluster_auto_shares_the_budget_by_failures():
    from orstack.distill.generate import GenerateConfig, cluster_quotas

    failures = {"a": [{}] * 6, "b": [{}] * 3, "c": [{}] * 1}
    quotas = cluster_quotas(failures, GenerateConfig("f", ["cmd:x"], per_cluster="auto", budget=7))
    assert sum(quotas.values()) == 7 and quotas["a"] > quotas["b"] >= quotas["c"]
    assert quotas == {"a": 4, "b": 2, "c": 1}
    assert cluster_quotas(failures, GenerateConfig("f", ["cmd:x"], per_cluster=2)) == {"a": 2, "b": 2, "c": 2}


def test_variant_requests_name_the_cluster_and_show_its_failures():
    from orstack.distill.generate import GenerateConfig, variant_requests

    reps = [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "kind": "numeric", "cluster_label": "doubling"}
            for i in range(4)]
    req = variant_requests(3, reps, GenerateConfig("f", ["cmd:x"], per_cluster=1))[0]
    assert "the capability gap 'doubling'" in req["prompt"]
    assert "- 1+1=" in req["prompt"] and "Problem: 0+0=" in req["prompt"]


@pytest.mark.parametrize("args,message", [
    (["--per-cluster", "auto"], "--per-cluster auto shares a total: give --budget N"),
    (["--per-cluster", "lots"], "--per-cluster lots: expected a whole number or auto"),
    (["--budget", "5"], "--budget is the total that --per-cluster auto shares out"),
])
def test_budget_bad_input(tmp_path, args, message):
    teacher, _ = _programs(tmp_path)
    out = tmp_path / "o.jsonl"
    done = run_orstack("distill", "generate", "--failures", str(_failures(tmp_path)), "--teacher", teacher,
                       *args, "-o", str(out))
    assert done.returncode == 2 and message in done.stderr and one_line(done.stderr) and not out.exists()


def test_bench_judges_text_tasks_and_counts_them(tmp_path, random_llama):
    """A random model's outputs graded by a judge that passes everything except a marked task:
    `correct` follows the judge (score >= 7), numeric tasks keep bench's verifier."""
    judge = tmp_path / "judge.py"
    judge.write_text("import json, sys\nfor line in sys.stdin:\n    t = json.loads(line)\n"
                     "    print(json.dumps({'id': t['id'], 'response': '3' if 'hard' in t['question'] else '9'}))\n")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in [
        {"id": "a", "prompt": "Write a poem.", "kind": "text"},
        {"id": "b", "prompt": "A hard essay.", "kind": "text"},
        {"id": "c", "prompt": "1+1=", "answer": "2", "kind": "numeric"}]))
    out, summary = tmp_path / "rows.jsonl", tmp_path / "summary.json"
    done = run_orstack("bench", str(random_llama), "--tasks", str(tasks), "--max-new-tokens", "4",
                       "--judge", f"cmd:{sys.executable} {judge}", "-o", str(out), "--summary", str(summary))
    assert done.returncode == 0, done.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert (rows["a"]["judge_score"], rows["a"]["correct"], rows["a"]["score"]) == (9, True, 0.9)
    assert (rows["b"]["judge_score"], rows["b"]["correct"]) == (3, False)
    assert "judge_score" not in rows["c"]
    s = json.loads(summary.read_text())["models"][0] if "models" in json.loads(summary.read_text()) else None
    assert s is None or s["judge"]["judged"] == 2
    # a judge that says nothing usable: one line, exit 2, nothing written
    out2 = tmp_path / "rows2.jsonl"
    done = run_orstack("bench", str(random_llama), "--tasks", str(tasks), "--max-new-tokens", "4",
                       "--judge", f"cmd:{sys.executable} -c 'import sys; [print(\"{{}}\") for _ in sys.stdin]'",
                       "-o", str(out2))
    last = done.stderr.strip().splitlines()[-1]  # (after bench's progress line)
    assert done.returncode == 2 and last.startswith("orstack: error: --judge") and "no score" in last
    assert "Traceback" not in done.stderr and not out2.exists()
    # no text task to judge
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(json.dumps({"id": "c", "prompt": "1+1=", "answer": "2", "kind": "numeric"}) + "\n")
    done = run_orstack("bench", str(random_llama), "--tasks", str(numeric), "--judge", f"cmd:{sys.executable} {judge}",
                       "-o", str(out2))
    assert done.returncode == 2 and "--judge grades `kind: text` tasks" in done.stderr
