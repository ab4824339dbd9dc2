"""distill and rl on the tiny default, measured end to end through the real commands.

distill: bench the tiny default on a probe slice of its *training* split, cluster the failures,
generate failure-targeted data (oracle `cmd:` teacher: the failures and --per-cluster new problems
per cluster), and train the student on it; compare with the same number of examples drawn at
random from all families (same teacher, same training settings). Then the same generation with a
GGUF teacher (a stronger tiny, exported with `orstack gguf`) as tier 1 in front of the oracle.
Accuracy on the held-out split, overall and on the failing (family, level) cells (probe
accuracy < 50%).

rl: the tiny default answers with the bare answer, so an efficiency reward has nothing to cut.
The benchmark first fine-tunes it on small arithmetic where 3 answers in 4 carry a wordy tail
(`48+57=` -> `105 is the answer.`, as chatty models pad), then runs GRPO from that verbose
student with and without the efficiency reward: accuracy and mean output tokens (greedy) on
1,000 arithmetic problems the RL step never saw, final KL, steps/s; and the same GRPO run
written directly against trl (trainer.train() steps/s, for orstack's overhead).

    python benchmarks/train.py            # the figures quoted in the README (~25 min here)
    python benchmarks/train.py --quick    # a smaller, faster look
    python benchmarks/train.py --only recipes   # rehearsal/mixing, early stopping, GRPO loss variants
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
RL_LR = "1e-3"
# The tiny keeps real probability on byte tokens it never saw in training: sampled at temperature 1
# its wordy tails come out garbled (57% of them, with stray digits the verifier then reads), so
# correctness alone would punish length. At 0.5 both answer forms are sampled intact.
RL_TEMPERATURE = "0.5"
RL_MAX_NEW_TOKENS = "24"
VERBOSE_TAIL = " is the answer."
ORACLE = f"cmd:{sys.executable} {ROOT / 'examples' / 'oracle.py'}"


def orstack(*args: str) -> float:
    """Run an orstack command (quiet), fail loudly, return its wall time. One thread each (OMP_NUM_THREADS
    overrides): on a shared 2-core machine 1 thread runs faster than 2, and plain trl gets the same."""
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
    """The tiny default (`orstack tiny`, default steps): the demo's build when cached, else built here."""
    if args.tiny:
        return Path(args.tiny), Path(args.tasks)
    cached = sorted((Path.home() / ".cache" / "orstack").glob("tiny-*-seed0-steps1000"))
    if cached and (cached[-1] / "model" / "config.json").exists():
        return cached[-1] / "model", cached[-1] / "tasks"
    if not (work / "tiny" / "config.json").exists():
        orstack("tiny", "-o", str(work / "tiny"), "--tasks-out", str(work / "tasks"))
    return work / "tiny", work / "tasks"


def find_gguf_teacher(args: argparse.Namespace, work: Path) -> Path:
    """The checkpoint exported as the GGUF teacher: --gguf-teacher, else the tiny default trained 3x longer."""
    if args.gguf_teacher:
        return Path(args.gguf_teacher)
    if not (work / "teacher-tiny" / "config.json").exists():
        orstack("tiny", "-o", str(work / "teacher-tiny"), "--steps", "3000")
    return work / "teacher-tiny"


def accuracy(rows: list[dict], cells: set | None = None) -> float:
    rows = [r for r in rows if cells is None or (r["family"], r["level"]) in cells]
    return sum(bool(r["correct"]) for r in rows) / max(1, len(rows))


def mean_tokens(rows: list[dict]) -> float:
    return sum(r["output_tokens"] for r in rows) / max(1, len(rows))


def bench(model: Path, tasks: Path, out: Path, max_new_tokens: str = "16") -> list[dict]:
    if out.exists():  # resume: outputs are written atomically, so an existing one is complete
        return read(out)
    orstack("bench", str(model), "--tasks", str(tasks), "-o", str(out), "--max-new-tokens", max_new_tokens,
            "--batch-size", "64")
    return read(out)


def train(data: Path, out: Path, tiny: Path, steps: int, rank: int = 32) -> float | None:
    """LoRA, merged: the same settings for every data set. Returns the training loop's seconds."""
    if not out.exists():  # else resume
        orstack("distill", "train", str(tiny), "--data", str(data), "-o", str(out), "--max-steps", str(steps),
                "--batch-size", "32", "--lr", "2e-3", "--lora-rank", str(rank), "--merge")
    return json.loads((out / "orstack.json").read_text())["metrics"].get("train_seconds")


def fresh_tasks(tasks: Path, n: int, seed: int, exclude: set[str], keep=lambda r: True) -> list[dict]:
    """`n` distinct tasks from the tiny default's training distribution (uniform over family and level,
    filtered by `keep`), never a held-out prompt nor one in `exclude`."""
    from orstack.tiny.tasks import make_train_rows

    held = {r["prompt"] for r in read(tasks / "heldout.jsonl")}
    out, seen = [], set(exclude)
    for row in make_train_rows(40 * n, seed, held):
        if keep(row) and row["prompt"] not in seen:
            seen.add(row["prompt"])
            out.append(row)
            if len(out) == n:
                return out
    sys.exit(f"only {len(out)} fresh tasks for seed {seed}; ask for fewer")


def generate(work: Path, failures: Path, out: str, teachers: list[str], per_cluster: int = 0) -> float | None:
    if (work / out).exists():
        return None
    extra = ["--per-cluster", str(per_cluster)] if per_cluster else []
    return orstack("distill", "generate", "--failures", str(failures), *[a for t in teachers for a in ("--teacher", t)],
                   *extra, "-o", str(work / out), "--report", str(work / out.replace(".jsonl", "_report.json")),
                   "--max-new-tokens", "16")


def tier_counts(report: Path) -> dict[int, dict[str, int]]:
    by_tier: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in json.loads(report.read_text())["rows"]:
        for key in ("asked", "accepted", "escalated"):
            by_tier[row["tier"]][key] += row[key]
    return by_tier


def targeted_data(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path
                  ) -> tuple[list[dict], set, int, float | None]:
    """Probe the tiny on its training split, cluster the failures and generate failure-targeted
    examples: (probe tasks, failing (family, level) cells, clusters, generation seconds)."""
    train_rows = read(tasks / "train.jsonl")
    random.Random(0).shuffle(train_rows)
    probe = train_rows[:args.probe]
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
    t_gen = generate(work, work / "failures.jsonl", "targeted.jsonl", [ORACLE], args.per_cluster)
    return probe, failing, n_clusters, t_gen


def distill_part(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path) -> None:
    probe, failing, n_clusters, t_gen = targeted_data(args, tiny, tasks, work)
    n = len(read(work / "targeted.jsonl"))
    # The same number of examples drawn at random from all families, answered by the same teacher.
    if not (work / "random.jsonl").exists():
        drawn = fresh_tasks(tasks, n, 11, {r["prompt"] for r in probe})
        write([dict(r, correct=False) for r in drawn], work / "random_tasks.jsonl")
        generate(work, work / "random_tasks.jsonl", "random.jsonl", [ORACLE])

    # A GGUF teacher in front of the oracle: a stronger tiny exported with `orstack gguf`. It cannot
    # write new problems (the oracle does) but answers what it can; only verified answers are kept.
    gguf = work / "teacher.gguf"
    if not gguf.exists():
        orstack("gguf", str(find_gguf_teacher(args, work)), "-o", str(gguf), "--no-validate")
    t_tiered = generate(work, work / "failures.jsonl", "tiered.jsonl", [str(gguf), ORACLE], args.per_cluster)
    tiers = tier_counts(work / "tiered_report.json")
    write([r for r in read(work / "tiered.jsonl") if r["source"].startswith("tier1:")], work / "gguf_only.jsonl")
    # Forgetting guard: a fifth of the targeted rows swapped for random ones (same total), as a user
    # would do with `cat targeted.jsonl replay.jsonl`.
    if not (work / "replay.jsonl").exists():
        kept = read(work / "targeted.jsonl")
        random.Random(1).shuffle(kept)
        write(kept[:n - n // 5] + read(work / "random.jsonl")[:n // 5], work / "replay.jsonl")

    heldout = tasks / "heldout.jsonl"
    results = [("base (tiny default)", "-", 0, bench(tiny, heldout, work / "base_heldout.jsonl"), None)]
    arms = (("random, all families", "oracle", "random"), ("targeted", "oracle", "targeted"),
            ("targeted + 20% random replay", "oracle", "replay"), ("targeted, tiered", "GGUF -> oracle", "tiered"),
            ("targeted, GGUF answers only", "GGUF", "gguf_only"))
    for name, teacher, data in arms:
        seconds = train(work / f"{data}.jsonl", work / f"student-{data}", tiny, args.distill_steps)
        results.append((name, teacher, len(read(work / f"{data}.jsonl")),
                        bench(work / f"student-{data}", heldout, work / f"{data}_heldout.jsonl"), seconds))

    gen_time = "" if t_gen is None else f"; generation: oracle {t_gen:.0f} s"
    gen_time += "" if t_tiered is None else f", GGUF -> oracle {t_tiered:.0f} s"
    print(f"\n## distill (probe {len(probe)} train-split tasks, {len(failing)} failing family/level cells, "
          f"{n_clusters} failure clusters, {args.per_cluster} new problems per cluster{gen_time}; "
          f"{args.distill_steps} LoRA r32 steps x 32 rows, merged)\n")
    print("| data | teacher | examples | held-out acc (failing cells) | held-out acc (overall) | train loop s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, teacher, count, rows, secs in results:
        print(f"| {name} | {teacher} | {count} | {accuracy(rows, failing):.3f} | {accuracy(rows):.3f} | "
              f"{'-' if secs is None else f'{secs:.0f}'} |")
    print(f"\nFailing cells: {', '.join(f'{f}-{lv}' for f, lv in sorted(failing))}.")
    print(f"Tiers (GGUF teacher {find_gguf_teacher(args, work)} -> oracle): tier 1 asked {tiers[1]['asked']}, "
          f"accepted {tiers[1]['accepted']}, escalated {tiers[1]['escalated']}; tier 2 asked {tiers[2]['asked']}, "
          f"accepted {tiers[2]['accepted']}.")


def plain_trl_grpo(model_dir: Path, tasks_path: Path, steps: int) -> float:
    """The same GRPO run as `orstack rl --efficiency-weight 0` below, written directly against trl; returns
    trainer.train() steps/s."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from orstack.tasks.stops import cut_at_stop, stop_sequences
    from orstack.tasks.verify import score_output

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # as the orstack subprocesses
    tasks = read(tasks_path)
    by_prompt = {t["prompt"]: t for t in tasks}

    def correct(prompts, completions, **kwargs):  # noqa: ANN001, ANN202
        return [float(bool(score_output(by_prompt[p], cut_at_stop(c, stop_sequences(by_prompt[p]))[0])[0]))
                for p, c in zip(prompts, completions)]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    args = GRPOConfig(output_dir="/tmp/plain-trl-grpo", use_cpu=True, report_to=[], beta=0.02, num_generations=8,
                      per_device_train_batch_size=32, max_completion_length=int(RL_MAX_NEW_TOKENS),
                      temperature=float(RL_TEMPERATURE), learning_rate=float(RL_LR),
                      max_steps=steps, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                      lr_scheduler_type="linear")
    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=args,
                          train_dataset=Dataset.from_list([{"prompt": t["prompt"]} for t in tasks]),
                          processing_class=tok, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    return steps / (time.perf_counter() - start)


def small_arithmetic(row: dict) -> bool:
    """Levels 1-2 of add, sub, mul: numeric answers (so a digit-free tail after them still scores) the tiny
    can learn."""
    return row["family"] in ("add", "sub", "mul") and row["level"] <= 2


def verbose_student(tiny: Path, tasks: Path, work: Path, exclude: set[str]) -> Path:
    """The tiny default fine-tuned on small arithmetic where 3 answers in 4 carry a wordy tail
    (`105 is the answer.`): text after the answer that cannot help the answer (it comes after it)
    and holds no digit (so the numeric verifier, which reads the last number, still scores it)."""
    out = work / "verbose"
    if not out.exists():
        rng = random.Random(0)
        rows = fresh_tasks(tasks, 6000, 7, exclude, small_arithmetic)
        write([{"id": r["id"], "prompt": r["prompt"],
                "response": r["answer"] + VERBOSE_TAIL if rng.random() < 0.75 else r["answer"]} for r in rows],
              work / "verbose_sft.jsonl")
        train(work / "verbose_sft.jsonl", out, tiny, 1500)
    return out


def rl_setup(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path) -> tuple[Path, Path, Path]:
    """The RL train tasks, the 1,000 unseen evaluation problems, and the verbose student RL starts from."""
    rl_tasks = work / "rl_tasks.jsonl"
    if not rl_tasks.exists():
        write(fresh_tasks(tasks, args.rl_tasks, 21, set(), small_arithmetic), rl_tasks)
    evaluation = work / "rl_eval.jsonl"
    if not evaluation.exists():
        write(fresh_tasks(tasks, 1000, 22, {r["prompt"] for r in read(rl_tasks)}, small_arithmetic), evaluation)
    verbose = verbose_student(tiny, tasks, work, {r["prompt"] for r in read(evaluation)})
    return rl_tasks, evaluation, verbose


def rl_part(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path) -> None:
    rl_tasks, evaluation, verbose = rl_setup(args, tiny, tasks, work)
    rows = [("tiny default (no RL)", bench(tiny, evaluation, work / "rl_eval_tiny.jsonl", RL_MAX_NEW_TOKENS), None),
            ("verbose student (RL start)",
             bench(verbose, evaluation, work / "rl_eval_verbose.jsonl", RL_MAX_NEW_TOKENS), None)]
    for name, weight in (("rl, correctness only", "0"), ("rl, + efficiency 0.2", "0.2")):
        out = work / f"rl-{weight}"
        if not out.exists():
            orstack("rl", str(verbose), "--tasks", str(rl_tasks), "-o", str(out), "--max-steps", str(args.rl_steps),
                    "--num-generations", "8", "--batch-size", "32", "--lr", RL_LR, "--max-new-tokens",
                    RL_MAX_NEW_TOKENS, "--temperature", RL_TEMPERATURE,
                    "--efficiency-weight", weight, "--target-length", "4", "--log", str(work / f"rl-{weight}.jsonl"))
        metrics = json.loads((out / "orstack.json").read_text())["metrics"]
        rows.append((name, bench(out, evaluation, work / f"rl_eval_{weight}.jsonl", RL_MAX_NEW_TOKENS), metrics))
    plain = plain_trl_grpo(verbose, rl_tasks, args.rl_steps)

    print(f"\n## rl ({args.rl_steps} GRPO steps from the verbose student, 8 generations x 4 prompts per step, "
          f"LoRA r8, lr {RL_LR}, temperature {RL_TEMPERATURE}, beta 0.02, target length 4 tokens, "
          f"{args.rl_tasks} arithmetic train tasks; "
          f"greedy accuracy and output tokens on 1,000 arithmetic problems RL never saw)\n")
    print("| model | accuracy | mean output tokens | final KL | steps/s |")
    print("|---|---:|---:|---:|---:|")
    for name, res, m in rows:
        kl = "-" if not m or m.get("kl_last") is None else f"{m['kl_last']:.3f}"
        sps = "-" if not m else f"{m['steps_per_s']:.2f}"
        print(f"| {name} | {accuracy(res):.3f} | {mean_tokens(res):.2f} | {kl} | {sps} |")
    print(f"| the correctness-only run written directly against trl | | | | {plain:.2f} |")
    cut = 1 - mean_tokens(rows[3][1]) / mean_tokens(rows[2][1])
    print(f"\nefficiency reward: length {100 * cut:.0f}% shorter than correctness-only, accuracy "
          f"{100 * (accuracy(rows[3][1]) - accuracy(rows[2][1])):+.1f} points; orstack overhead vs plain trl "
          f"(trainer.train() steps/s, correctness-only run): {100 * (plain / rows[2][2]['steps_per_s'] - 1):+.1f}%")


def recipe_train(tiny: Path, out: Path, data: Path, steps: int, *extra: str) -> dict:
    """distill train with the benchmark's fixed settings plus `extra` recipe options; its metrics."""
    if not out.exists():
        orstack("distill", "train", str(tiny), "--data", str(data), "-o", str(out), "--max-steps", str(steps),
                "--batch-size", "32", "--lr", "2e-3", "--lora-rank", "32", "--merge", *extra)
    return json.loads((out / "orstack.json").read_text())["metrics"]


def recipes_part(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path) -> None:
    """Rehearsal and mixing against forgetting, and validation with early stopping and the best
    checkpoint, on the failure-targeted data; then trl's GRPO loss variants on the efficiency task."""
    probe, failing, _, _ = targeted_data(args, tiny, tasks, work)
    heldout = tasks / "heldout.jsonl"
    base = bench(tiny, heldout, work / "base_heldout.jsonl")
    targeted = work / "targeted.jsonl"
    general = tasks / "train.jsonl"  # the tiny's own training tasks: what rehearsal replays
    # validation sets drawn fresh from the training distribution (never held-out or probe prompts)
    seen = {r["prompt"] for r in probe}
    if not (work / "val_failing.jsonl").exists():
        write(fresh_tasks(tasks, 200, 31, seen, lambda r: (r["family"], r["level"]) in failing),
              work / "val_failing.jsonl")
        write(fresh_tasks(tasks, 200, 32, seen), work / "val_general.jsonl")
    steps = args.distill_steps
    every = max(1, steps // 10)
    arms = [("targeted (last step)", recipe_train(tiny, work / "r-targeted", targeted, steps), "r-targeted"),
            ("targeted + 10% rehearsal", recipe_train(tiny, work / "r-rehearsal", targeted, steps,
                                                       "--mix", str(general), "--rehearsal", "0.1"), "r-rehearsal"),
            ("65/35 general/targeted", recipe_train(tiny, work / "r-6535", targeted, steps, "--mix", str(general),
                                                     "--rehearsal", "0.65"), "r-6535"),
            ("targeted, best of validations", recipe_train(
                tiny, work / "r-best", targeted, steps, "--eval", f"{work / 'val_failing.jsonl'}:0.7",
                "--eval", f"{work / 'val_general.jsonl'}:0.3", "--eval-every", str(every), "--early-stop", "6",
                "--save-best", "accuracy"), "r-best")]
    rows = {name: bench(work / d, heldout, work / f"{d}_heldout.jsonl") for name, _, d in arms}
    other = {(r["family"], r["level"]) for r in base} - failing
    gain = accuracy(rows["targeted (last step)"], failing) - accuracy(base, failing)
    print(f"\n## distill recipes ({steps} LoRA r32 steps x 32 rows, lr 2e-3, merged; held-out accuracy on "
          f"{len(failing)} failing cells and the {len(other)} other cells; general = the tiny's train split)\n")
    print("| recipe | failing cells | other cells | overall | share of targeted gain | steps run | selected step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| base (tiny default) | {accuracy(base, failing):.3f} | {accuracy(base, other):.3f} | "
          f"{accuracy(base):.3f} | - | - | - |")
    for name, metrics, _ in arms:
        res = rows[name]
        share = (accuracy(res, failing) - accuracy(base, failing)) / gain if gain else float("nan")
        print(f"| {name} | {accuracy(res, failing):.3f} | {accuracy(res, other):.3f} | {accuracy(res):.3f} | "
              f"{100 * share:.0f}% | {metrics['steps']} | {metrics.get('selected_step', '-')} |")
    best = json.loads((work / "r-best" / "orstack.json").read_text())["metrics"]
    print(f"\nvalidation (70% failing-cell + 30% general accuracy, every {every} steps, patience 6): best "
          f"{best['eval_best_accuracy']:.3f} at step {best['eval_best_step']}, last {best['eval_last_accuracy']:.3f} "
          f"at step {best['eval_last_step']}" + (f", stopped early at {best['stopped_early_at']}"
                                                 if best.get("stopped_early_at") else ""))
    rl_variants_part(args, tiny, tasks, work)


def rl_variants_part(args: argparse.Namespace, tiny: Path, tasks: Path, work: Path) -> None:
    """trl's GRPO loss variants from the verbose student with the efficiency reward."""
    rl_tasks, evaluation, verbose = rl_setup(args, tiny, tasks, work)
    steps = args.variant_steps
    table = []
    for name, extra in (("grpo", ["--loss-type", "grpo"]), ("dapo (trl's default)", ["--loss-type", "dapo"]),
                        ("dr_grpo, no reward scaling", ["--loss-type", "dr_grpo", "--scale-rewards", "none"]),
                        ("GSPO (sequence ratios)", ["--loss-type", "dapo", "--importance-sampling", "sequence"])):
        tag = name.split()[0].replace(",", "")
        out = work / f"rlv-{tag}"
        if not out.exists():
            orstack("rl", str(verbose), "--tasks", str(rl_tasks), "-o", str(out), "--max-steps", str(steps),
                    "--num-generations", "8", "--batch-size", "32", "--lr", RL_LR, "--max-new-tokens",
                    RL_MAX_NEW_TOKENS, "--temperature", RL_TEMPERATURE, "--efficiency-weight", "0.2",
                    "--target-length", "4", *extra)
        metrics = json.loads((out / "orstack.json").read_text())["metrics"]
        table.append((name, bench(out, evaluation, work / f"rlv_eval_{tag}.jsonl", RL_MAX_NEW_TOKENS), metrics))
    start = bench(verbose, evaluation, work / "rl_eval_verbose.jsonl", RL_MAX_NEW_TOKENS)
    print(f"\n## rl loss variants ({steps} GRPO steps from the verbose student, efficiency reward 0.2, target 4 "
          f"tokens; greedy on 1,000 unseen arithmetic problems)\n")
    print("| loss | accuracy | mean output tokens | final KL | steps/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| (start: verbose student) | {accuracy(start):.3f} | {mean_tokens(start):.2f} | - | - |")
    for name, res, m in table:
        kl = "-" if m.get("kl_last") is None else f"{m['kl_last']:.4f}"
        print(f"| {name} | {accuracy(res):.3f} | {mean_tokens(res):.2f} | {kl} | {m['steps_per_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smaller settings (figures not quoted).")
    parser.add_argument("--tiny", help="Tiny default checkpoint (default: the demo's cached build, else built).")
    parser.add_argument("--tasks", help="Its task directory (train.jsonl, heldout.jsonl).")
    parser.add_argument("--work", default="/tmp/orstack-bench-train")
    parser.add_argument("--only", choices=("distill", "rl", "recipes", "rl-variants"))
    parser.add_argument("--variant-steps", type=int, help="GRPO steps per loss variant (default 300, --quick 100).")
    parser.add_argument("--gguf-teacher", help="Checkpoint exported as the GGUF teacher (default: `orstack tiny "
                        "--steps 3000`, built once in the work directory).")
    args = parser.parse_args()
    args.probe = 600
    args.per_cluster = 100 if args.quick else 300
    args.distill_steps = 500 if args.quick else 1500
    args.rl_steps = 200 if args.quick else 500
    args.rl_tasks = 600
    args.variant_steps = args.variant_steps or (100 if args.quick else 300)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tiny, tasks = find_tiny(args, work)
    start = time.perf_counter()
    if args.only == "recipes":
        recipes_part(args, tiny, tasks, work)
    elif args.only == "rl-variants":
        rl_variants_part(args, tiny, tasks, work)
    else:
        if args.only != "rl":
            distill_part(args, tiny, tasks, work)
        if args.only != "distill":
            rl_part(args, tiny, tasks, work)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
