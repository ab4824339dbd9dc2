"""Where `orstack bench` and `orstack distill train` spend their time on SmolLM2-135M-Instruct.

Both commands run under cProfile as the CLI runs them (`python -m cProfile -m orstack ...`), on
the real-model suite (orstack/tasks/suites.py); the profile is folded into a few phases
(start-up imports, loading, generation, scoring, training forward/backward/optimizer, saving).
Then the SFT step itself, in one process: the fast path (micro-batches of similar length,
logits only at response positions) beside the plain padded full-logits step, on the same rows,
seconds per optimizer step.

    python benchmarks/profile_real.py --tasks 32 --steps 6
"""

from __future__ import annotations

import argparse
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# (phase, "path fragment:function" patterns whose outermost cumulative time is the phase)
BENCH_PHASES = [
    ("model load", ("backends/base.py:open_backend",)),
    ("generation: model forward", ("torch/nn/modules/module.py:_call_impl",)),
    ("generation: the rest of the loop (Python, sampling, cache, stops)", ("orstack/backends/hf.py:generate",)),
    ("scoring (verifiers, code sandbox)", ("orstack/tasks/results.py:score_rows",)),
]
TRAIN_PHASES = [
    ("model load", ("orstack/io/checkpoint.py:load_model",)),
    ("encode rows", ("orstack/train/data.py:encode_rows",)),
    ("training: forward", ("torch/nn/modules/module.py:_call_impl",)),
    ("training: backward", ("torch/_tensor.py:backward",)),
    ("training: optimizer step", ("torch/optim/:step",)),
    ("training: the rest of the step (collate, clip, loss)", ("orstack/train/loop.py:train_loop",)),
    ("merge / save", ("orstack/train/lora.py:save_trained",)),
]


def profile_cli(args: list[str], prof: Path) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "orstack", "--quiet", *args], check=True)
    return time.perf_counter() - began


def breakdown(prof: Path, phases: list[tuple[str, tuple[str, ...]]], wall: float) -> list[tuple[str, float]]:
    stats = pstats.Stats(str(prof))
    rows = []
    imports = max((ct for (f, _, n), (_, _, _, ct, _) in stats.stats.items()  # type: ignore[attr-defined]
                   if n == "<module>" and f.endswith("orstack/cli.py")), default=0.0)
    rows.append(("start-up: importing orstack.cli", imports))
    for label, names in phases:
        rows.append((label, sum(_cum(stats, n) for n in names)))
    rows.append(("total under cProfile (wall of the process)", wall))
    return rows


def _cum(stats: pstats.Stats, pattern: str) -> float:
    """The cumulative time of the function `pattern` names ("path fragment:function"); cProfile
    counts a recursive function's outermost calls only, so nested forwards are not added twice."""
    fragment, name = pattern.split(":")
    best = 0.0
    for (filename, _, fname), (_, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if fname == name and fragment in filename:
            best = max(best, ct)
    return best


def exclusive(rows: list[tuple[str, float]], parent: str, children: list[str]) -> list[tuple[str, float]]:
    """Subtract the children's time from their parent's (a loop's own time without the forward)."""
    d = dict(rows)
    d[parent] = max(0.0, d[parent] - sum(d[c] for c in children))
    return [(label, d[label]) for label, _ in rows]


def step_speed(model_dir: Path, data: Path, steps: int, batch_size: int, rounds: int = 2,
               layers: int | None = None) -> dict[str, float]:
    """Seconds per optimizer step of the plain and the fast path, same rows, same seed, one
    process; the paths alternate (plain, fast, plain, fast ...) so a change in machine load
    falls on both alike. The model is loaded once and copied for every run."""
    import copy

    from orstack.io.checkpoint import load_model
    from orstack.runtime import seed_everything
    from orstack.train import sft
    from orstack.train.config import TrainConfig
    from orstack.train.data import encode_rows, read_examples
    from orstack.train.lora import apply_lora

    rows = read_examples(str(data))
    base, tokenizer = load_model(str(model_dir), device="cpu")
    if layers:  # SmolLM2's widths and vocabulary, random weights, fewer layers: a quicker stand-in
        import torch
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(base.config)
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config)
    config = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-3, seed=0)
    encoded = encode_rows(tokenizer, rows, config.max_length, str(data))
    seconds: dict[str, list[float]] = {"plain": [], "fast": []}
    out: dict[str, float] = {}
    original = sft.accepts_logits_to_keep
    for _ in range(rounds):
        for label in ("plain", "fast"):
            seed_everything(0)
            model = apply_lora(copy.deepcopy(base), config)
            if label == "plain":
                sft.accepts_logits_to_keep = lambda model: False  # type: ignore[assignment]
            try:
                result = sft.train_sft(model, tokenizer, encoded, config)
            finally:
                sft.accepts_logits_to_keep = original  # type: ignore[assignment]
            seconds[label].append(result.seconds / result.steps)
            out[f"{label}_loss_last"] = result.loss_last or 0.0
    for label, values in seconds.items():
        out[label] = sum(values) / len(values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=32, help="half-A tasks benched (and failures trained on)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--keep", type=Path, help="keep the profiles and files here")
    ap.add_argument("--rounds", type=int, default=2, help="plain/fast alternations of the step comparison")
    ap.add_argument("--layers", type=int, help="step comparison on a random model of SmolLM2's shape with N layers")
    ap.add_argument("--step-only", type=Path, metavar="ROWS.jsonl",
                    help="only the SFT step comparison, on these training rows (e.g. a run's distill-train.jsonl)")
    args = ap.parse_args()
    from smollm2 import smollm2_checkpoint

    from orstack.tasks import suites

    model = smollm2_checkpoint()
    if args.step_only:
        print_step_speed(model, args.step_only, args.steps, args.batch_size, args.rounds, args.layers)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="orstack-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    a, _ = suites.make_suite(suites.SuiteConfig(per_cell=2, humaneval=2))
    step = max(1, len(a) // args.tasks)
    tasks = a[::step][:args.tasks]
    suites.write_jsonl(tasks, work / "tasks.jsonl")

    wall_bench = profile_cli(["bench", str(model), "--tasks", str(work / "tasks.jsonl"), "-o",
                              str(work / "results.jsonl")], work / "bench.prof")
    bench_rows = breakdown(work / "bench.prof", BENCH_PHASES, wall_bench)
    bench_rows = exclusive(bench_rows, BENCH_PHASES[2][0], [BENCH_PHASES[1][0]])

    # training rows: the oracle's answers to the tasks (what distill generate would verify and write)
    problems = suites.humaneval_problems()
    train_rows = []
    for t in tasks:
        user = t["messages"][-1]["content"] if t["kind"] != "code" else t["messages"][0]["content"]
        answer = (suites.humaneval_solution(user, problems) if t["kind"] == "code" else suites.solve(user))
        train_rows.append({"id": t["id"], "messages": [*t["messages"][:1], {"role": "assistant", "content": (
            t["messages"][1]["content"] + answer if t["kind"] == "code" else answer)}]})
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    wall_train = profile_cli(["distill", "train", str(model), "--data", str(work / "train.jsonl"), "--max-steps",
                              str(args.steps), "--batch-size", str(args.batch_size), "-o", str(work / "adapter")],
                             work / "train.prof")
    train_rows_t = breakdown(work / "train.prof", TRAIN_PHASES, wall_train)
    train_rows_t = exclusive(train_rows_t, TRAIN_PHASES[5][0], [TRAIN_PHASES[2][0], TRAIN_PHASES[3][0],
                                                                 TRAIN_PHASES[4][0]])

    for title, rows in ((f"orstack bench, {len(tasks)} suite tasks (batch 16)", bench_rows),
                        (f"orstack distill train, {args.steps} steps x batch {args.batch_size}", train_rows_t)):
        print(f"\n{title}\n| phase | seconds | share |\n|---|---:|---:|")
        wall = rows[-1][1]
        for label, seconds in rows:
            print(f"| {label} | {seconds:.1f} | {100 * seconds / wall:.0f}% |")

    print_step_speed(model, work / "train.jsonl", args.steps, args.batch_size, args.rounds, args.layers)


def print_step_speed(model: Path, data: Path, steps: int, batch_size: int, rounds: int,
                     layers: int | None = None) -> None:
    speed = step_speed(model, data, steps, batch_size, rounds, layers)
    n = sum(1 for line in data.read_text().splitlines() if line.strip())
    print(f"\nSFT step, the same {n} rows, {steps} steps x batch {batch_size}, one process\n"
          "| path | s/step | last loss |\n|---|---:|---:|")
    print(f"| plain (padded batch, logits at every position) | {speed['plain']:.2f} | {speed['plain_loss_last']:.4f} |")
    print(f"| fast (length micro-batches, response logits only) | {speed['fast']:.2f} | "
          f"{speed['fast_loss_last']:.4f} |")
    print(f"speed-up {speed['plain'] / speed['fast']:.2f}x")


if __name__ == "__main__":
    main()
