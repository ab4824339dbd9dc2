"""`orstack merge` on the tiny default: two students distilled on different failure clusters
(arithmetic: add/sub/mul; strings: reverse/sort/copy), every method's merge of them scored on
both clusters' held-out tasks beside the two parents, the base and a student trained on the
union of their data; the evolved recipe beside the fixed ones; time and peak memory of each
merge. One table, then the memory of a streamed merge against holding the models in memory.

The students: the base is benched on its training-distribution tasks (train.jsonl); its
failures in each cluster, with their verified answers as responses (what an exact teacher
would write), are the cluster's training rows; `distill train --merge` (LoRA, folded) gives a
checkpoint per cluster, and the union student trains on both sets for the sum of the steps.
The held-out tasks of each cluster are split in two, interleaved: the search half is the
fitness of `--evolve` (and picks which method to evolve), the report half gives the table.

Every merge is one `orstack merge` process: wall time and peak RSS (os.wait4's ru_maxrss).
The memory check makes three random Llamas large enough to see (hidden 1280, 4 layers:
~240 MB each in float32) and compares the peak RSS of `orstack merge --method ties` on
them with a process that loads all three state dicts and merges them in memory, beside a
process that only imports torch (the floor).

    python benchmarks/merge.py                      # builds everything under .orstack-cache/bench-merge
    python benchmarks/merge.py --tiny DIR           # start from an existing tiny build (DIR/model, DIR/tasks)
    python benchmarks/merge.py --quick              # small budgets (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CLUSTERS = {"arithmetic": ("add", "sub", "mul"), "strings": ("reverse", "sort", "copy")}
FIXED = [
    ("linear", ["--method", "linear"]),
    ("slerp", ["--method", "slerp", "--t", "0.5"]),
    ("task-arithmetic", ["--method", "task-arithmetic", "--base", "{base}"]),
    ("ties", ["--method", "ties", "--base", "{base}", "--density", "0.5"]),
    ("dare-ties", ["--method", "dare-ties", "--base", "{base}", "--density", "0.5"]),
    ("dare-linear", ["--method", "dare-linear", "--base", "{base}", "--density", "0.5"]),
]


def orstack_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orstack", "--quiet", "--threads", "1", *map(str, args)]


def orstack(*args: str) -> None:
    print("$ orstack " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run(orstack_cmd(*args), check=True)


def measured(cmd: list[str]) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS in MB) of one process."""
    print("$ " + " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd), file=sys.stderr, flush=True)
    began = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - began, usage.ru_maxrss / 1024


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cluster_of(row: dict) -> str | None:
    return next((c for c, families in CLUSTERS.items() if row.get("family") in families), None)


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The tiny default, the task splits, the cluster data and the three students (made once)."""
    tiny, tasks = work / "tiny", work / "tasks"
    if not (tiny / "orstack.json").exists():
        if args.tiny is not None:
            shutil.copytree(args.tiny / "model", tiny)
            shutil.copytree(args.tiny / "tasks", tasks)
        else:
            orstack("tiny", "-o", tiny, "--tasks-out", tasks, "--steps", str(args.steps))
    heldout = [r for r in read(tasks / "heldout.jsonl") if cluster_of(r)]
    search = write(heldout[0::2], work / "search.jsonl")
    report = write(heldout[1::2], work / "report.jsonl")
    if not (work / "base-train.jsonl").exists():
        orstack("bench", tiny, "--tasks", tasks / "train.jsonl", "-o", work / "base-train.jsonl")
    failures = [r for r in read(work / "base-train.jsonl") if not r["correct"] and cluster_of(r)]
    data = {}
    for cluster in CLUSTERS:
        rows = [{"id": r["id"], "prompt": r["prompt"], "response": r["answer"], "cluster": cluster}
                for r in failures if cluster_of(r) == cluster]
        data[cluster] = write(rows, work / f"data-{cluster}.jsonl")
    data["union"] = write(read(data["arithmetic"]) + read(data["strings"]), work / "data-union.jsonl")
    models = {"base": tiny}
    union_steps = args.union_steps or 2 * args.sft_steps
    for name, steps in (("arithmetic", args.sft_steps), ("strings", args.sft_steps), ("union", union_steps)):
        out = work / name
        if not (out / "orstack.json").exists():
            orstack("distill", "train", tiny, "--data", data[name], "--max-steps", str(steps), "--lr", "1e-3",
                    "--merge", "-o", out)
        models[name] = out
    return {"search": search, "report": report, **models}


def bench(models: dict[str, Path], tasks: Path, out: Path) -> dict[str, dict[str, float]]:
    """{model label: {cluster: accuracy, "both": accuracy}} from one `orstack bench` run."""
    orstack("bench", *models.values(), "--tasks", tasks, "-o", out)
    by_path = {str(p): label for label, p in models.items()}
    groups: dict[str, dict[str, list[bool]]] = {}
    for row in read(out):
        label = by_path[row["model"]]
        per = groups.setdefault(label, {})
        per.setdefault(cluster_of(row), []).append(bool(row["correct"]))
        per.setdefault("both", []).append(bool(row["correct"]))
    return {label: {k: sum(v) / len(v) for k, v in per.items()} for label, per in groups.items()}


def merges(work: Path, paths: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """Each fixed method's merge of the two students: {label: {path, seconds, peak_mb}}."""
    out = {}
    for label, options in FIXED:
        target = work / f"merge-{label}"
        options = [o.replace("{base}", str(paths["base"])) for o in options]
        code, seconds, peak = measured(orstack_cmd("merge", paths["arithmetic"], paths["strings"], *options,
                                                   "-o", target))
        if code != 0:
            raise SystemExit(f"merge {label} exited {code}")
        out[label] = {"path": target, "seconds": seconds, "peak_mb": peak}
    return out


def evolve(work: Path, paths: dict[str, Path], method: str, args: argparse.Namespace) -> dict:
    options = dict(FIXED)[method]
    options = [o.replace("{base}", str(paths["base"])) for o in options]
    target, log = work / f"evolved-{method}", work / f"evolve-{method}.jsonl"
    code, seconds, peak = measured(orstack_cmd(
        "merge", paths["arithmetic"], paths["strings"], *options, "--evolve", "--tasks", paths["search"],
        "--generations", str(args.generations), "--population", str(args.population), "--log", log,
        "--force", "-o", target))
    if code != 0:
        raise SystemExit(f"evolve exited {code}")
    manifest = json.loads((target / "orstack.json").read_text())
    return {"path": target, "seconds": seconds, "peak_mb": peak, "manifest": manifest, "log": read(log)}


MEMORY_SCRIPT = """
import sys, torch
from safetensors.torch import load_file
from orstack.merge import methods
paths = sys.argv[1:]
base, a, b = (load_file(p + "/model.safetensors") for p in paths)
merged = {k: methods.ties(base[k], [a[k], b[k]], [1.0, 1.0], [0.5, 0.5], 1.0) for k in base}
print(len(merged))
"""
BUILD_SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import build_random_llama
build_random_llama(__import__("pathlib").Path(sys.argv[1]), hidden=int(sys.argv[2]), layers=int(sys.argv[3]),
                   seed=int(sys.argv[4]))
"""
FLOOR_SCRIPT = "import torch, safetensors.torch"


def memory(work: Path, args: argparse.Namespace) -> dict:
    """Peak RSS of a streamed merge against merging with every model in memory."""
    root = work / "memory"
    root.mkdir(exist_ok=True)
    paths = []
    for seed in range(3):
        p = root / f"m{seed}"
        if not (p / "model.safetensors").exists():
            # in a child: this process stays free of torch, so its children's peak RSS is their own
            # (a forked child's ru_maxrss starts at the parent's resident size)
            subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(p), str(args.memory_hidden),
                            str(args.memory_layers), str(seed)], check=True)
        paths.append(p)
    size_mb = (paths[0] / "model.safetensors").stat().st_size / 1e6
    _, floor_s, floor = measured([sys.executable, "-c", FLOOR_SCRIPT])
    code, streamed_s, streamed = measured(orstack_cmd("merge", paths[1], paths[2], "--method", "ties", "--base",
                                                      paths[0], "-o", root / "merged"))
    assert code == 0
    _, inmem_s, inmem = measured([sys.executable, "-c", MEMORY_SCRIPT, *map(str, paths)])
    return {"model_mb": size_mb, "floor_mb": floor, "streamed_mb": streamed, "streamed_s": streamed_s,
            "in_memory_mb": inmem, "in_memory_s": inmem_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".orstack-cache" / "bench-merge")
    parser.add_argument("--tiny", type=Path, help="an existing tiny build (DIR/model, DIR/tasks)")
    parser.add_argument("--steps", type=int, default=1000, help="tiny default training steps")
    parser.add_argument("--sft-steps", type=int, default=150, help="distill train steps per cluster student")
    parser.add_argument("--union-steps", type=int, help="steps of the union student (default: 2 x --sft-steps)")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--memory-hidden", type=int, default=1280)
    parser.add_argument("--memory-layers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="small budgets: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.sft_steps, args.generations, args.population = 300, 40, 2, 3
        args.memory_hidden, args.memory_layers = 256, 2
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args)
    made = merges(work, paths, args)
    singles = {k: paths[k] for k in ("base", "arithmetic", "strings", "union")}
    merged = {k: v["path"] for k, v in made.items()}
    search = bench({**singles, **merged}, paths["search"], work / "search-results.jsonl")
    best_fixed = max(made, key=lambda k: search[k]["both"])
    evolved = evolve(work, paths, best_fixed, args)
    label = f"evolved {best_fixed}"
    report = bench({**singles, **merged, label: evolved["path"]}, paths["report"],
                   work / "report-results.jsonl")
    n_report = {c: sum(1 for r in read(paths["report"]) if cluster_of(r) == c) for c in CLUSTERS}
    mem = memory(work, args)

    gate = evolved["manifest"]["metrics"]["gate"]
    recipe = {k: v for k, v in evolved["manifest"]["recipe"].items() if k != "args"}
    lines = [
        f"Tiny default ({args.steps} steps); students: distill train --merge, {args.sft_steps} steps per cluster "
        f"({args.union_steps or 2 * args.sft_steps} for the union); report tasks: arithmetic "
        f"{n_report['arithmetic']}, strings {n_report['strings']}",
        "",
        "| model | arithmetic | strings | both | search (both) | merge s | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = ["base", "arithmetic", "strings", "union", *made, label]
    for name in names:
        r = report[name]
        info = made.get(name) or (evolved if name == label else None)
        s = search.get(name, {}).get("both") if name != label else evolved["manifest"]["metrics"]["merge_fitness"]
        shown = {"arithmetic": "arithmetic student", "strings": "strings student", "union": "union student",
                 "base": "base (tiny)"}.get(name, f"merge: {name}")
        cells = ["" if s is None else f"{s:.1%}", "" if info is None else f"{info['seconds']:.1f}",
                 "" if info is None else f"{info['peak_mb']:.0f}"]
        lines.append(f"| {shown} | {r['arithmetic']:.1%} | {r['strings']:.1%} | {r['both']:.1%} | "
                     + " | ".join(cells) + " |")
    ev = evolved["manifest"]["metrics"]["evolve"]
    lines += [
        "",
        f"Evolved ({best_fixed}, the best fixed method on the search half): {ev['candidates']} candidates "
        f"({args.generations} generations x {args.population}), search fitness {ev['fixed_recipe_fitness']:.1%} "
        f"(fixed recipe) -> {ev['best_fitness']:.1%}; recipe {json.dumps(recipe)}; gate against the best single "
        f"input on the search half: {'passed' if gate['passed'] else 'FAILED (written with --force)'}.",
        "",
        f"Memory (three random Llamas, {mem['model_mb']:.0f} MB each in float32; ties of two against the third): "
        f"python + torch alone {mem['floor_mb']:.0f} MB; orstack merge (streamed) "
        f"{mem['streamed_mb']:.0f} MB in {mem['streamed_s']:.1f} s; the three state dicts loaded and merged in "
        f"memory {mem['in_memory_mb']:.0f} MB in {mem['in_memory_s']:.1f} s.",
    ]
    print("\n".join(lines))
    (work / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
