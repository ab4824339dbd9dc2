"""Every weight-touching stage on every decoder family (issue 13): one table, family x stage.

Each cell runs the real CLI (`python -m orstack ...`, one process per command, `--threads 1`)
on a tiny random-init checkpoint of the family (tests/families.py: hidden 256, 2 layers;
gemma3_text 6, smollm3 4), then applies the stage's own correctness check to what was written:

- prune: `prune --nsamples 2 --seqlen 16` (wanda, 50 % per row); every decoder linear's rows
  are at least 50 % zeros.
- awq: `awq --nsamples 2 --seqlen 16`, and again with `--fake-quant`; packed logits ==
  fake-quant logits (<= 1e-5).
- gguf: `gguf --type f32 --validate` (the bundled llama.cpp); greedy argmax agreement 100 % and
  max abs logit difference <= 1e-2 x the largest abs logit (the stage's own F32 gate).
- vocab-trim: `vocab-trim --corpus`; kept-token logits == the original's (<= 1e-6), corpus
  lines tokenize the same after reload, a tied embedding stays tied.
- distill train: `distill train --max-steps 2` (LoRA), and again with `--merge`; the adapter
  changes logits; merged == base + adapter (<= 1e-4).
- rl: `rl --max-steps 2 --num-generations 2`; 2 GRPO steps in the manifest, finite logits.
- route modifiers: a second adapter (other data); `route run --mode fast`, and `--mode accurate`
  with both modifiers, on one prompt under two domains: base, modifier A and modifier B give
  three different mean log-probs.
- bench: `bench --tasks` (2 tasks); a row per task, none with an error.
- zstd-pack: `zstd-pack`, `zstd-pack --verify`, then unpacked (`-d`'s `run_unpack`); verify passes and every unpacked
  file equals the original byte for byte.

Exit statuses are the CLI's (0 ok, 2 bad input / unsupported family ...); a cell is green only
when the exit status is 0 and the check holds. Times are the stage's own command (wall).

    python benchmarks/families.py                         # all families, all stages; markdown on stdout
    python benchmarks/families.py --families llama,phi3 --stages gguf,vocab-trim --jobs 2
    python benchmarks/families.py --json out.json         # also every figure, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from families import FAMILIES, SAMPLE_TEXT, build_family  # noqa: E402

STAGES = ("prune", "awq", "gguf", "vocab-trim", "distill train", "rl", "route modifiers", "bench", "zstd-pack")
TEXT = "12+345=357 rev abc=cba"
TRAIN = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(4) for b in range(2)]
TRAIN_STRINGS = [{"prompt": f"rev {w}=", "response": w[::-1]} for w in ("abc", "dcba", "fox", "dog", "jugs", "box")]
TASKS = [{"id": "a", "prompt": "2+3=", "answer": "5", "kind": "numeric", "max_new_tokens": 4},
         {"id": "b", "prompt": "rev abc=", "answer": "cba", "kind": "exact", "max_new_tokens": 4}]
# the same prompt under two domains: route's two modifiers answer it, --mode fast the base
ROUTE_TASKS = [{"id": "m", "prompt": "2+3=", "answer": "5", "kind": "numeric", "domain": "math", "max_new_tokens": 4},
               {"id": "s", "prompt": "2+3=", "answer": "5", "kind": "numeric", "domain": "string",
                "max_new_tokens": 4}]
TRAIN_ARGS = ["--max-steps", "2", "--lr", "1e-2", "--batch-size", "4"]
TIMEOUT = 900
# Families run in threads, but only their CLI processes run at once: transformers' loading is not
# thread-safe (one thread's meta-device init context leaks into another's from_pretrained), so a
# family's in-process checks hold this lock, which `orstack()` lets go of while its process runs.
CHECKS = threading.Lock()


@dataclass
class Cell:
    exit: int | None = None  # the stage command's exit status (None: not run)
    ok: bool = False  # exit 0 and the check holds
    seconds: float = 0.0
    detail: str = ""  # the check's figures, or the command's error line


def orstack(*args: str) -> tuple[int, float, str]:
    """One CLI process: (exit status, wall seconds, last stderr line)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NO_COLOR="1")
    start = time.perf_counter()
    CHECKS.release()
    try:
        done = subprocess.run([sys.executable, "-m", "orstack", "--quiet", "--threads", "1", *args], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, f"timed out after {TIMEOUT} s"
    finally:
        CHECKS.acquire()
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return done.returncode, time.perf_counter() - start, (lines[-1] if lines else "")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def logits(path: Path | str, text: str = TEXT):
    import torch

    from orstack.io.checkpoint import load_model

    model, tok = load_model(str(path), device="cpu")
    with torch.no_grad():
        return model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits


def decoder_linears(model) -> list:
    import torch
    from transformers.pytorch_utils import Conv1D

    from orstack.train.lora import decoder_layers

    _, layers = decoder_layers(model)
    return [(n, m) for block in layers for n, m in block.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D))]


def failed(code: int, seconds: float, err: str) -> Cell:
    return Cell(code, False, seconds, err.removeprefix("orstack: error: ")[:160])


# ---------------------------------------------------------------------------- one function per stage

def stage_prune(model: Path, work: Path, inputs: dict) -> Cell:
    out = work / "pruned"
    code, secs, err = orstack("prune", str(model), "--calib", str(inputs["text"]), "--nsamples", "2", "--seqlen", "16",
                              "-o", str(out))
    if code:
        return failed(code, secs, err)
    from orstack.io.checkpoint import load_model

    pruned, _ = load_model(str(out), device="cpu")
    worst = min(float((m.weight == 0).float().mean(dim=1).min()) for _, m in decoder_linears(pruned))
    return Cell(code, worst >= 0.5, secs, f"min row sparsity {worst:.3f}")


def stage_awq(model: Path, work: Path, inputs: dict) -> Cell:
    calib = ["--calib", str(inputs["text"]), "--nsamples", "2", "--seqlen", "16"]
    code, secs, err = orstack("awq", str(model), *calib, "-o", str(work / "awq"))
    if code:
        return failed(code, secs, err)
    code2, _, err2 = orstack("awq", str(model), *calib, "--fake-quant", "-o", str(work / "awq-fake"))
    if code2:
        return Cell(code, False, secs, f"--fake-quant: exit {code2}: {err2[:120]}")
    diff = float((logits(work / "awq") - logits(work / "awq-fake")).abs().max())
    return Cell(code, diff <= 1e-5, secs, f"packed vs fake-quant max abs diff {diff:.2g}")


def stage_gguf(model: Path, work: Path, inputs: dict) -> Cell:
    out = work / "model.gguf"
    code, secs, err = orstack("gguf", str(model), "--type", "f32", "--validate", "-o", str(out))
    if code:
        return failed(code, secs, err)
    from orstack.gguf.metadata import read_gguf_manifest

    v = (read_gguf_manifest(out) or {}).get("metrics", {})
    agreement, diff, scale = v.get("agreement"), v.get("max_logit_diff"), v.get("logit_scale")
    if agreement is None or diff is None:
        return Cell(code, False, secs, "no validation figures in the GGUF manifest")
    ok = agreement == 1.0 and diff <= 1e-2 * scale
    return Cell(code, ok, secs, f"argmax {agreement:.1%} of {v.get('tokens_compared')}, max abs logit diff "
                                f"{diff:.2g} of {scale:.2g}")


def stage_vocab_trim(model: Path, work: Path, inputs: dict) -> Cell:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "trimmed"
    code, secs, err = orstack("vocab-trim", str(model), "--corpus", str(inputs["corpus"]), "-o", str(out))
    if code:
        return failed(code, secs, err)
    old_to_new = json.loads((out / "orstack.json").read_text())["vocab_map"]["old_to_new"]
    kept = [o for o, n in enumerate(old_to_new) if n is not None]
    a_tok, b_tok = AutoTokenizer.from_pretrained(model), AutoTokenizer.from_pretrained(out)
    a, b = AutoModelForCausalLM.from_pretrained(model).eval(), AutoModelForCausalLM.from_pretrained(out).eval()
    lines = inputs["corpus_lines"]
    same = all(b_tok(t, add_special_tokens=False)["input_ids"]
               == [old_to_new[i] for i in a_tok(t, add_special_tokens=False)["input_ids"]] for t in lines)
    ids = a_tok("rev abc=cba\n3*4=12", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        diff = float((a(torch.tensor([ids])).logits[..., kept]
                      - b(torch.tensor([[old_to_new[i] for i in ids]])).logits).abs().max())
    tied = a.config.tie_word_embeddings
    still = (b.get_output_embeddings().weight.data_ptr() == b.get_input_embeddings().weight.data_ptr()) == tied
    ok = diff <= 1e-6 and same and still
    return Cell(code, ok, secs, f"{len(old_to_new)}->{len(kept)} rows, kept-logit diff {diff:.2g}, "
                                f"tokenization {'same' if same else 'CHANGED'}, "
                                f"{'tied' if tied else 'untied'}{'' if still else ' NOT kept'}")


def stage_distill(model: Path, work: Path, inputs: dict) -> Cell:
    adapter = work / "adapter-math"
    code, secs, err = orstack("distill", "train", str(model), "--data", str(inputs["train"]), *TRAIN_ARGS,
                              "-o", str(adapter))
    if code:
        return failed(code, secs, err)
    code2, _, err2 = orstack("distill", "train", str(model), "--data", str(inputs["train"]), *TRAIN_ARGS, "--merge",
                             "-o", str(work / "merged"))
    if code2:
        return Cell(code, False, secs, f"--merge: exit {code2}: {err2[:120]}")
    base, adapted, merged = logits(model), logits(adapter), logits(work / "merged")
    change, gap = float((adapted - base).abs().max()), float((merged - adapted).abs().max())
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    return Cell(code, change > 1e-3 and gap <= 1e-4, secs, f"adapter moves logits {change:.2g}; merged vs "
                f"base+adapter {gap:.2g}; LoRA on {','.join(sorted(targets))}")


def stage_rl(model: Path, work: Path, inputs: dict) -> Cell:
    import torch

    out = work / "rl"
    code, secs, err = orstack("rl", str(model), "--tasks", str(inputs["tasks"]), "--max-steps", "2",
                              "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "4", "-o", str(out))
    if code:
        return failed(code, secs, err)
    steps = json.loads((out / "orstack.json").read_text()).get("metrics", {}).get("steps")
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    finite = bool(torch.isfinite(logits(out)).all())
    return Cell(code, steps == 2 and finite, secs, f"{steps} steps, LoRA on {','.join(leaves)}, "
                                                   f"logits {'finite' if finite else 'NOT finite'}")


def stage_route(model: Path, work: Path, inputs: dict) -> Cell:
    math = work / "adapter-math"
    if not (math / "adapter_config.json").is_file():
        return Cell(None, False, 0.0, "no distill train adapter to route to")
    strings = work / "adapter-string"
    code, _, err = orstack("distill", "train", str(model), "--data", str(inputs["train_strings"]), *TRAIN_ARGS,
                           "-o", str(strings))
    if code:
        return Cell(None, False, 0.0, f"second adapter: exit {code}: {err[:120]}")
    tasks = str(inputs["route_tasks"])
    code, _, err = orstack("route", "run", tasks, "--base", str(model), "--mode", "fast",
                           "-o", str(work / "fast.jsonl"))
    if code:
        return failed(code, 0.0, "--mode fast: " + err)
    code, secs, err = orstack("route", "run", tasks, "--base", str(model), "--mode", "accurate",
                              f"--modifier=math={math}", f"--modifier=string={strings}", "-o", str(work / "acc.jsonl"))
    if code:
        return failed(code, secs, err)
    fast = [json.loads(line) for line in (work / "fast.jsonl").read_text().splitlines()]
    acc = [json.loads(line) for line in (work / "acc.jsonl").read_text().splitlines()]
    paths = [r["route"]["path"] for r in acc]
    values = [fast[0]["mean_logprob"], acc[0]["mean_logprob"], acc[1]["mean_logprob"]]
    ok = paths == ["modifier:math", "modifier:string"] and len(set(values)) == 3
    return Cell(code, ok, secs, "mean logprob base/math/string " + " / ".join(f"{v:.4f}" for v in values))


def stage_bench(model: Path, work: Path, inputs: dict) -> Cell:
    out = work / "bench.jsonl"
    code, secs, err = orstack("bench", str(model), "--tasks", str(inputs["tasks"]), "-o", str(out))
    if code:
        return failed(code, secs, err)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r["error"] for r in rows if r.get("error")]
    return Cell(code, len(rows) == len(TASKS) and not errors, secs,
                f"{len(rows)} rows, {len(errors)} errors" + (f" ({errors[0][:80]})" if errors else ""))


def stage_zstd(model: Path, work: Path, inputs: dict) -> Cell:
    pack, restored = work / "model.orz", work / "restored"
    code, secs, err = orstack("zstd-pack", str(model), "-o", str(pack))
    if code:
        return failed(code, secs, err)
    verify, _, err = orstack("zstd-pack", "--verify", str(pack))
    if verify:
        return Cell(code, False, secs, f"--verify: exit {verify}: {err[:120]}")
    from orstack.zstd_pack import run_unpack

    run_unpack(pack, restored)  # what `zstd-pack -d` does, in this process (one CLI start-up less)
    files = sorted(p for p in model.iterdir() if p.is_file())
    differ = [f.name for f in files if (restored / f.name).read_bytes() != f.read_bytes()]
    size = sum(f.stat().st_size for f in files)
    ratio = f"{size / pack.stat().st_size:.2f}x"
    return Cell(code, not differ, secs, f"--verify ok, {len(files)} files bit-exact, {ratio}" if not differ else
                f"unpacked files differ: {', '.join(differ)}")


RUNNERS = {"prune": stage_prune, "awq": stage_awq, "gguf": stage_gguf, "vocab-trim": stage_vocab_trim,
           "distill train": stage_distill, "rl": stage_rl, "route modifiers": stage_route, "bench": stage_bench,
           "zstd-pack": stage_zstd}


def run_family(family: str, root: Path, inputs: dict, stages: list[str]) -> dict[str, Cell]:
    model = root / "models" / family
    work = root / "work" / family
    shutil.rmtree(work, ignore_errors=True)  # a rerun starts clean (outputs orstack did not write are refused)
    work.mkdir(parents=True)
    cells = {}
    with CHECKS:
        for stage in stages:
            cells[stage] = run_stage(family, stage, model, work, inputs)
    return cells


def run_stage(family: str, stage: str, model: Path, work: Path, inputs: dict) -> Cell:
    try:
        cell = RUNNERS[stage](model, work, inputs)
    except Exception as e:  # a check that crashed is a red cell, not a lost table
        cell = Cell(None, False, 0.0, f"check crashed: {type(e).__name__}: {str(e)[:120]}")
    print(f"{family:12} {stage:16} exit {cell.exit} {'ok' if cell.ok else 'RED'} {cell.seconds:.0f}s {cell.detail}",
          file=sys.stderr, flush=True)
    return cell


def markdown(results: dict[str, dict[str, Cell]], stages: list[str]) -> str:
    def cell(c: Cell) -> str:
        if c.exit is None:
            return "✗ –"
        return f"{'✓' if c.ok else '✗'} {c.exit} · {c.seconds:.0f} s"

    lines = ["| family | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for family, cells in results.items():
        lines.append(f"| {family} | " + " | ".join(cell(cells[s]) for s in stages) + " |")
    lines += ["", "✓/✗: exit status 0 and the stage's own check held / did not; then the exit status and the "
              "stage command's wall time.", "", "| family | stage | check |", "|---|---|---|"]
    for family, cells in results.items():
        for s in stages:
            lines.append(f"| {family} | {s} | {'' if cells[s].ok else '**red**: '}{cells[s].detail} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--jobs", type=int, default=2, help="families run at once")
    parser.add_argument("--work", type=Path, default=None, help="keep checkpoints and outputs here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in RUNNERS]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
    root = args.work or Path(tempfile.mkdtemp(prefix="orstack-families-"))
    root.mkdir(parents=True, exist_ok=True)
    corpus_lines = "rev abc=cba\nsort dcba=abcd\n3*4=12\ncmp 17 9=>\n12+345=357\n"
    inputs = {"text": root / "text.txt", "corpus": root / "corpus.txt", "corpus_lines": corpus_lines.splitlines(),
              "train": write_rows(root / "train.jsonl", TRAIN),
              "train_strings": write_rows(root / "train_strings.jsonl", TRAIN_STRINGS),
              "tasks": write_rows(root / "tasks.jsonl", TASKS),
              "route_tasks": write_rows(root / "route_tasks.jsonl", ROUTE_TASKS)}
    inputs["text"].write_text(SAMPLE_TEXT, encoding="utf-8")
    inputs["corpus"].write_text(corpus_lines * 30, encoding="utf-8")  # drops ~30 merged tokens
    start = time.perf_counter()
    from orstack.console import set_quiet

    set_quiet(True)  # the in-process checks' progress bars
    import torch  # noqa: F401 - imported (and transformers' lazy modules resolved) before the threads start
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from orstack.io.checkpoint import load_model  # noqa: F401

    for family in families:  # built here, one at a time: lazy imports are not thread-safe
        if not (root / "models" / family / "config.json").is_file():
            build_family(family, root / "models" / family)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = dict(zip(families, pool.map(lambda f: run_family(f, root, inputs, stages), families)))
    print(markdown(done, stages))
    print(f"\n{len(families)} families x {len(stages)} stages in {time.perf_counter() - start:.0f} s "
          f"(work directory {root})", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({f: {s: asdict(c) for s, c in cells.items()} for f, cells in done.items()},
                                        indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
