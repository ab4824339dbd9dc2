"""distill and rl on the tiny default, measured end to end through the real commands.

distill: bench the tiny model on a probe slice of its *training* split, cluster the failures,
generate failure-targeted data (oracle `cmd:` teacher; then a GGUF teacher), and train the
same student on it; compare with the same number of examples drawn at random from all
families (same teacher, same training settings). Accuracy on the held-out split, overall
and on the failing (family, level) cells (probe accuracy < 50%).

rl: GRPO from the tiny model with and without the efficiency reward (accuracy and mean
output tokens on the held-out split, final KL, steps/s), and the same GRPO run written
directly against trl (steps/s of trainer.train(), for orstack's overhead).

    python benchmarks/train.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORACLE = f"cmd:{sys.executable} {ROOT / 'examples' / 'oracle.py'}"


def orstack(*args: str) -> float:
    """Run an orstack command (quiet), fail loudly, return its wall time. One thread each: on this
    shared, loaded 2-core machine, 1 thread runs faster than 2."""
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, "-m", "orstack", "--quiet", *args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        sys.exit(f"orstack {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - start


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def find_tiny(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    if args.tiny:
        return Path(args.tiny), Path(args.tasks)
    cached = sorted((Path.home() / ".cache" / "orstack").glob("tiny-*-seed0-steps400"))
    if cached and (cached[-1] / "model" / "config.json").exists():
        return cached[-1] / "model", cached[-1] / "tasks"
    orstack("tiny", "-o", str(work / "tiny"), "--tasks-out", str(work / "tasks"), "--steps", "400")
    return work / "tiny", work / "tasks"


def accuracy(rows: list[dict], cells: set | None = None) -> float:
    rows = [r for r in rows if cells is None or (r["family"], r["level"]) in cells]
    return sum(bool(r["correct"]) for r in rows) / max(1, len(rows))


def bench(model: Path, tasks: Path, out: Path) -> list[dict]:
    if out.exists():  # resume: outputs are written atomically, so an existing one is complete
        return read(out)
    orstack("bench", str(model), "--tasks", str(tasks), "-o", str(out), "--max-new-tokens", "16",
            "--batch-size", "64")
    return read(out)


def train(data: Path, out: Path, tiny: Path, steps: int, merge: bool = True) -> float | None:
    if out.exists():  # resume
        return json.loads((out / "orstack.json").read_text())["metrics"].get("train_seconds")
    extra = ["--merge"] if merge else []
    return orstack("distill", "train", str(tiny), "--data", str(data), "-o", str(out), "--max-steps", str(steps),
                   "--batch-size", "32", "--lr", "2e-3", "--lora-rank", "16", *extra)


def distill_part(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path) -> list[tuple]:
    train_rows = read(tasks / "train.jsonl")
    rng = random.Random(0)
    rng.shuffle(train_rows)
    probe, rest = train_rows[:args.probe], train_rows[args.probe:]
    write(probe, work / "probe.jsonl")
    probe_res = bench(tiny, work / "probe.jsonl", work / "probe_results.jsonl")
    by_cell = defaultdict(list)
    for r in probe_res:
        by_cell[(r["family"], r["level"])].append(bool(r["correct"]))
    failing = {c for c, v in by_cell.items() if sum(v) / len(v) < 0.5}

    if not (work / "failures.jsonl").exists():
        orstack("cluster-failures", str(work / "probe_results.jsonl"), "-o", str(work / "clusters.jsonl"),
                "--annotate", str(work / "failures.jsonl"), "--embedder", "tfidf", "-k", "auto")
    n_clusters = len(read(work / "clusters.jsonl"))
    t_gen = None
    if not (work / "targeted.jsonl").exists():
        t_gen = orstack("distill", "generate", "--failures", str(work / "failures.jsonl"), "--teacher", ORACLE,
                        "--per-cluster", str(args.per_cluster), "-o", str(work / "targeted.jsonl"),
                        "--report", str(work / "targeted_report.json"))
    targeted = read(work / "targeted.jsonl")
    n = len(targeted)
    # The same number of examples, drawn at random from all families, answered by the same teacher.
    # (A few more rows are drawn because duplicate prompts are dropped; the set is then cut to n.)
    if not (work / "random.jsonl").exists():
        write([dict(r, correct=False) for r in rest[:n + n // 10]], work / "random_tasks.jsonl")
        orstack("distill", "generate", "--failures", str(work / "random_tasks.jsonl"), "--teacher", ORACLE,
                "-o", str(work / "random.jsonl"))
        write(read(work / "random.jsonl")[:n], work / "random.jsonl")

    heldout = tasks / "heldout.jsonl"
    base = bench(tiny, heldout, work / "base_heldout.jsonl")
    results = [("base (tiny default)", "-", 0, base, None)]
    for name, data in (("random", "random.jsonl"), ("targeted, cmd: oracle", "targeted.jsonl")):
        seconds = train(work / data, work / f"student-{data[:-6]}", tiny, args.distill_steps)
        results.append((name, "oracle", n, bench(work / f"student-{data[:-6]}", heldout,
                                                 work / f"{data[:-6]}_heldout.jsonl"), seconds))

    # A GGUF teacher: a stronger tiny model (--gguf-teacher, default the tiny default trained for 1000
    # steps) exported with `orstack gguf`, as tier 1 in front of the oracle; and alone (only what it
    # gets right survives verification).
    gguf = work / "teacher.gguf"
    if not gguf.exists():
        orstack("gguf", str(args.gguf_teacher or work / "student-targeted"), "-o", str(gguf), "--no-validate")
    if not (work / "tiered.jsonl").exists():
        # The failures only (no new problems): llama.cpp answers one prompt at a time, and the quick run
        # must stay short on this loaded machine.
        orstack("distill", "generate", "--failures", str(work / "failures.jsonl"), "--teacher", str(gguf),
                "--teacher", ORACLE, "-o", str(work / "tiered.jsonl"),
                "--report", str(work / "tiered_report.json"), "--max-new-tokens", "16")
    tier_report = json.loads((work / "tiered_report.json").read_text())["rows"]
    by_tier = defaultdict(lambda: defaultdict(int))
    for row in tier_report:
        for key in ("asked", "accepted", "escalated"):
            by_tier[row["tier"]][key] += row[key]
    gguf_only = [r for r in read(work / "tiered.jsonl") if r["source"].startswith("tier1:")]
    write(gguf_only, work / "gguf_only.jsonl")
    seconds = train(work / "gguf_only.jsonl", work / "student-gguf", tiny, args.distill_steps)
    results.append(("targeted, GGUF teacher only", "gguf", len(gguf_only),
                    bench(work / "student-gguf", heldout, work / "gguf_heldout.jsonl"), seconds))

    gen_time = "" if t_gen is None else f"; generate with the oracle: {t_gen:.1f} s"
    print(f"\n## distill (probe {len(probe)} train-split tasks, {len(failing)} failing family/level cells, "
          f"{n_clusters} failure clusters{gen_time}; GGUF teacher: {args.gguf_teacher or 'the targeted student'}; "
          f"{args.distill_steps} LoRA steps x 32 rows, merged)\n")
    print("| data | teacher | examples | held-out acc (failing cells) | held-out acc (overall) | train s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, teacher, count, rows, secs in results:
        print(f"| {name} | {teacher} | {count} | {accuracy(rows, failing):.3f} | {accuracy(rows):.3f} | "
              f"{'-' if secs is None else f'{secs:.0f}'} |")
    print(f"\nrandom rows: {len(read(work / 'random.jsonl'))}; targeted rows: {n}.")
    print(f"\nTiers (GGUF -> oracle) on the same failures: tier 1 asked {by_tier[1]['asked']}, accepted "
          f"{by_tier[1]['accepted']}, escalated {by_tier[1]['escalated']}; tier 2 asked {by_tier[2]['asked']}, "
          f"accepted {by_tier[2]['accepted']}.")
    return results


def plain_trl_grpo(tiny: Path, tasks_path: Path, steps: int) -> float:
    """The same GRPO run as `orstack rl --efficiency-weight 0`, written directly against trl; steps/s."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from orstack.bench.scoring import score_output

    tasks = read(tasks_path)
    by_prompt = {t["prompt"]: t for t in tasks}

    def correct(prompts, completions, **kwargs):  # noqa: ANN001, ANN202
        return [float(bool(score_output(by_prompt[p], c.split("\n")[0])[0])) for p, c in zip(prompts, completions)]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    tok = AutoTokenizer.from_pretrained(str(tiny))
    args = GRPOConfig(output_dir="/tmp/plain-trl-grpo", use_cpu=True, report_to=[], beta=0.02, num_generations=4,
                      per_device_train_batch_size=4, max_completion_length=16, learning_rate=1e-4, max_steps=steps,
                      logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, lr_scheduler_type="linear")
    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=args,
                          train_dataset=Dataset.from_list([{"prompt": t["prompt"]} for t in tasks]),
                          processing_class=tok, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    return steps / (time.perf_counter() - start)


def rl_part(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path) -> None:
    train_rows = read(tasks / "train.jsonl")
    random.Random(1).shuffle(train_rows)
    write(train_rows[:args.rl_tasks], work / "rl_tasks.jsonl")
    heldout = tasks / "heldout.jsonl"
    base = read(work / "base_heldout.jsonl") if (work / "base_heldout.jsonl").exists() else bench(
        tiny, heldout, work / "base_heldout.jsonl")
    rows = [("base (tiny default)", base, None)]
    for name, weight in (("rl, correctness only", "0"), ("rl, + efficiency 0.2", "0.2")):
        out = work / f"rl-{weight}"
        orstack("rl", str(tiny), "--tasks", str(work / "rl_tasks.jsonl"), "-o", str(out), "--max-steps",
                str(args.rl_steps), "--num-generations", "4", "--max-new-tokens", "16", "--efficiency-weight", weight,
                "--target-length", "8", "--log", str(work / f"rl-{weight}.jsonl"))
        metrics = json.loads((out / "orstack.json").read_text())["metrics"]
        rows.append((name, bench(out, heldout, work / f"rl-{weight}_heldout.jsonl"), metrics))
    plain = plain_trl_grpo(tiny, work / "rl_tasks.jsonl", args.rl_steps)

    print(f"\n## rl ({args.rl_steps} GRPO steps, 4 generations x 1 prompt per step, LoRA r8, beta 0.02, "
          f"{args.rl_tasks} train-split tasks; held-out greedy accuracy and output tokens)\n")
    print("| model | held-out acc | mean output tokens | final KL | steps/s |")
    print("|---|---:|---:|---:|---:|")
    for name, res, m in rows:
        tokens = sum(r["output_tokens"] for r in res) / len(res)
        kl = "-" if not m or m.get("kl_last") is None else f"{m['kl_last']:.1e}"
        sps = "-" if not m else f"{m['steps_per_s']:.3f}"
        print(f"| {name} | {accuracy(res):.3f} | {tokens:.2f} | {kl} | {sps} |")
    ours = rows[1][2]["steps_per_s"]
    print(f"| same run written directly against trl | | | | {plain:.3f} |")
    print(f"\norstack overhead vs plain trl (trainer.train() steps/s, correctness-only run): "
          f"{100 * (plain / ours - 1):+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small settings (about 10-15 minutes here).")
    parser.add_argument("--tiny", help="Tiny default checkpoint (default: the test cache, else built).")
    parser.add_argument("--tasks", help="Its task directory (train.jsonl, heldout.jsonl).")
    parser.add_argument("--work", default="/tmp/orstack-bench-train")
    parser.add_argument("--only", choices=("distill", "rl"))
    parser.add_argument("--gguf-teacher", help="Checkpoint exported as the GGUF teacher (default: the tiny "
                        "default trained 1000 steps when cached, else the targeted student).")
    args = parser.parse_args()
    args.probe = 600 if args.quick else 2000
    args.per_cluster = 40 if args.quick else 100
    args.distill_steps = 150 if args.quick else 400
    args.rl_steps = 20 if args.quick else 100
    args.rl_tasks = 200 if args.quick else 1000
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tiny, tasks = find_tiny(args, work)
    if args.gguf_teacher is None:
        stronger = tiny.parent.parent / tiny.parent.name.replace("steps400", "steps1000") / "model"
        args.gguf_teacher = str(stronger) if (stronger / "config.json").exists() else None
    start = time.perf_counter()
    if args.only != "rl":
        distill_part(args, tiny, tasks, work)
    if args.only != "distill":
        rl_part(args, tiny, tasks, work)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
