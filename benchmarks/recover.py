"""Recovery that keeps compression: dense -> prune 50% -> awq 4-bit -> distill train --recover,
on the tiny default and SmolLM2-135M; quality after each step, the output's format, and the
share of the compression's loss the recovery regains.

    nice -n 10 python benchmarks/recover.py --only tiny           # the tests' 400-step tiny (~minutes)
    python benchmarks/recover.py --only tiny --tiny demo-out/tiny  # the demo's 1,000-step tiny default
    nice -n 10 python benchmarks/recover.py --only smollm2 --steps 20
    nice -n 10 python benchmarks/recover.py --only smollm2 --cheap --modes qat --steps 10   # magnitude + RTN

Quality: the tiny default's answer perplexity on 300 held-out tasks and its greedy accuracy on
them; SmolLM2's perplexity on the Apache-2.0 licence text (calibration and recovery text are
the GPL-3 and GFDL licences: disjoint). Recovery: a rank-8 LoRA trained on the compressed
base, --recover-fraction 1 (every row), both --recover-mode qat (straight-through rounding onto
the awq grid while training) and round (rounded once when folding), from the awq output
(pruned + 4-bit) and from the prune output (sparse). "regained" = (compressed - recovered) /
(compressed - dense) of the figure (perplexity; accuracy for the tiny's second column).
Every recovered output is checked: pruned weights exactly zero, weights on the input's grid,
the same weights_format as its input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
LICENSES = Path("/usr/share/common-licenses")


def runtime():  # noqa: ANN201
    from orstack.runtime import Runtime

    return Runtime(device="cpu", threads=1, seed=0)


def prune(src: Path, out: Path, calib: list[Path], seqlen: int, nsamples: int, method: str) -> None:
    from orstack.prune import run
    from orstack.prune.stage import PruneConfig

    run(src, out, PruneConfig(method=method, sparsity=0.5, nsamples=nsamples, seqlen=seqlen,
                              calib=[str(p) for p in calib], force=True), runtime())


def awq(src: Path, out: Path, calib: list[Path], group: int, seqlen: int, nsamples: int, rtn: bool) -> None:
    from orstack.awq import run
    from orstack.awq.search import AWQConfig

    run(src, out, AWQConfig(bits=4, group_size=group, nsamples=nsamples, seqlen=seqlen, rtn=rtn,
                            calib=[str(p) for p in calib], force=True), runtime())


def recover(src: Path, out: Path, data: Path, mode: str, steps: int, lr: float, batch: int, max_length: int) -> dict:
    from orstack.distill.train import DistillTrainConfig, run_train
    from orstack.train.config import TrainConfig

    config = DistillTrainConfig(data=str(data), recover=True, recover_fraction=1.0, recover_mode=mode,
                                train=TrainConfig(max_steps=steps, lr=lr, batch_size=batch, lora_rank=8,
                                                  max_length=max_length, warmup_steps=max(1, steps // 10)))
    start = time.perf_counter()
    result = run_train(str(src), out, config, runtime())
    m = result.metrics
    print(f"recover {src.name} {mode}: loss on the rows {m['recover_loss_all']:.4f} -> "
          f"{m['recover_loss_all_after']:.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return m


def weights_format(path: Path) -> str:
    from orstack.io.checkpoint import detect_format

    return detect_format(path)


def min_sparsity(path: Path) -> float:
    from orstack.io.checkpoint import load_model
    from orstack.layerwise import decoder_layers, linear_modules

    model, _ = load_model(path, with_tokenizer=False)
    return min(float((m.weight == 0).float().mean()) for layer in decoder_layers(model)
               for m in linear_modules(layer).values())


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def tiny_quality(tasks: list[dict], tasks_file: Path):  # noqa: ANN201
    from awq import answer_ppl

    def measure(path: Path) -> tuple[float, float]:
        import torch

        from orstack.io.checkpoint import load_model
        from orstack.tiny.model import evaluate

        torch.set_num_threads(1)
        model, tokenizer = load_model(path)
        with torch.no_grad():
            acc = evaluate(model, tokenizer, tasks)["heldout_accuracy"]
        return answer_ppl(path, tasks_file), 100 * acc

    return measure


def text_quality(heldout: list[Path], max_length: int):  # noqa: ANN201
    def measure(path: Path) -> tuple[float, None]:
        import torch

        from orstack.backends.perplexity import perplexity
        from orstack.io.checkpoint import load_model
        from orstack.io.text import read_texts

        torch.set_num_threads(1)
        model, tokenizer = load_model(path)
        texts = list(read_texts([str(p) for p in heldout]))
        return perplexity(model, tokenizer, texts, max_length=max_length).ppl, None

    return measure


def regained(dense: float, compressed: float, recovered: float) -> str:
    lost = compressed - dense
    return f"{100 * (compressed - recovered) / lost:+.0f}%" if abs(lost) > 1e-9 else "-"


def bench(name: str, model: Path, work: Path, *, calib: list[Path], data: Path, measure, group: int, seqlen: int,
          nsamples: int, steps: int, lr: float, batch: int, max_length: int, cheap: bool = False,
          modes: tuple[str, ...] = ("qat", "round"), sparse_row: bool = True) -> list[dict]:
    pruned, packed = work / f"{name}-pruned", work / f"{name}-pruned-awq"
    method = "magnitude" if cheap else "wanda"
    if not (pruned / "orstack.json").exists():
        prune(model, pruned, calib, seqlen, nsamples, method)
    if not (packed / "orstack.json").exists():
        awq(pruned, packed, calib, group, seqlen, nsamples, rtn=cheap)
    quant = "RTN" if cheap else "awq"
    rows = [{"step": "dense", "path": model}, {"step": f"prune 50% ({method})", "path": pruned},
            {"step": f"prune -> {quant} 4-bit g{group}", "path": packed}]
    for src, label in ((packed, f"prune -> {quant}"), (pruned, "prune")):
        if src == pruned and not sparse_row:
            continue
        for mode in (modes if src == packed else ("qat",)):
            out = work / f"{name}-{src.name}-rec-{mode}"
            metrics = recover(src, out, data, mode, steps, lr, batch, max_length)
            rows.append({"step": f"{label} -> recover ({mode})", "path": out, "base": src, "metrics": metrics})
    for row in rows:
        row["quality"] = measure(row["path"])
        row["format"] = weights_format(row["path"])
        row["min_sparsity"] = min_sparsity(row["path"])
        row["bytes"] = weight_bytes(row["path"])
        if "base" in row:
            assert row["format"] == weights_format(row["base"]), (row["step"], row["format"])
        print(f"{name}: {row['step']}: {row['quality']}", file=sys.stderr, flush=True)
    return rows


def table(name: str, rows: list[dict], second: str | None) -> str:
    dense = rows[0]["quality"]
    by_path = {str(r["path"]): r for r in rows}
    head = f"| {name} | format | min sparsity | weights MB | ppl | regained |"
    if second:
        head += f" {second} | regained |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        q = r["quality"]
        base = by_path.get(str(r.get("base")))
        cells = [r["step"], r["format"], f"{r['min_sparsity']:.2f}", f"{r['bytes'] / 1e6:.2f}", f"{q[0]:.3f}",
                 regained(dense[0], base["quality"][0], q[0]) if base else ""]
        if second:
            cells += [f"{q[1]:.1f}", regained(dense[1], base["quality"][1], q[1]) if base else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["tiny", "smollm2"], help="run one model")
    ap.add_argument("--steps", type=int, default=None, help="recovery steps (tiny 150, SmolLM2 30)")
    ap.add_argument("--work", type=Path, default=None, help="keep the checkpoints here (and reuse them)")
    ap.add_argument("--cheap", action="store_true", help="SmolLM2: magnitude pruning and RTN instead of Wanda and AWQ")
    ap.add_argument("--modes", default="qat,round", help="recovery modes from the awq output")
    ap.add_argument("--no-sparse-row", action="store_true", help="skip the recovery of the prune output alone")
    ap.add_argument("--tasks", type=int, default=300, help="tiny: held-out tasks measured")
    ap.add_argument("--rows", type=int, default=None, help="tiny: training rows recovered on (default: all 2,000)")
    ap.add_argument("--tiny", type=Path, help="a tiny default built by `orstack tiny -o DIR --tasks-out DIR/../tasks` "
                                              "(default: the tests' cached 400-step build)")
    args = ap.parse_args()
    from awq import smollm2, tiny_default

    from orstack.io.jsonl import read_jsonl

    with tempfile.TemporaryDirectory(prefix="orstack-recover-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        out = []
        if args.only in (None, "tiny"):
            if args.tiny:
                model, calib = args.tiny, [args.tiny.parent / "tasks" / "corpus.txt"]
            else:
                model, calib, _ = tiny_default()
            tasks_dir = model.parent / "tasks"
            heldout = list(read_jsonl(tasks_dir / "heldout.jsonl"))[:args.tasks]
            tasks_file = work / f"tiny-heldout-{args.tasks}.jsonl"
            tasks_file.write_text("".join(json.dumps(r) + "\n" for r in heldout), encoding="utf-8")
            data = work / "tiny-rows.jsonl"
            data.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "response": r["answer"]}) + "\n"
                                    for r in list(read_jsonl(tasks_dir / "train.jsonl"))[:args.rows]),
                            encoding="utf-8")
            steps = args.steps or 150
            rows = bench("tiny", model, work, calib=calib, data=data, measure=tiny_quality(heldout, tasks_file),
                         group=128, seqlen=64, nsamples=32, steps=steps, lr=1e-3, batch=16, max_length=64,
                         modes=tuple(args.modes.split(",")), sparse_row=not args.no_sparse_row)
            out.append(f"tiny default, {steps} recovery steps of 16 rows (its train.jsonl), lr 1e-3, "
                       f"{len(heldout)} held-out tasks\n"
                       + table("tiny default", rows, "accuracy %"))
        if args.only in (None, "smollm2"):
            model, calib, heldout = smollm2()
            from orstack.io.text import read_texts

            text = "\n".join(read_texts([str(p) for p in calib]))
            chunks = [text[i:i + 600] for i in range(0, len(text), 600)]
            data = work / "smollm2-rows.jsonl"
            data.write_text("".join(json.dumps({"id": i, "text": c}) + "\n" for i, c in enumerate(chunks)),
                            encoding="utf-8")
            steps = args.steps or 30
            rows = bench("smollm2", model, work, calib=calib, data=data, measure=text_quality(heldout, 256),
                         group=64, seqlen=128, nsamples=16, steps=steps, lr=5e-4, batch=4, max_length=128,
                         cheap=args.cheap, modes=tuple(args.modes.split(",")), sparse_row=not args.no_sparse_row)
            out.append(f"SmolLM2-135M, {steps} recovery steps of 4 x 128-token licence-text rows, lr 5e-4\n"
                       + table("SmolLM2-135M", rows, None))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
