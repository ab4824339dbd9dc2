"""AWQ vs round-to-nearest vs the original model, at 4 bits, on the tiny default and SmolLM2-135M.

Each method runs as its own `orstack awq` process (so peak memory is per method) with the
same calibration and held-out text; text perplexity comes from the output's manifest. The
"quality ppl" column, on which the share of RTN's gap closed is computed, is that text
perplexity for SmolLM2 and, for the tiny default, the perplexity of the answer tokens of its
held-out tasks (its training objective), read back from the written (packed) checkpoints.

    python benchmarks/awq.py            # tiny default (g128) and SmolLM2-135M (g64)
    python benchmarks/awq.py --quick    # fewer/shorter calibration windows, tiny only

Text: the tiny default's own corpus.txt / heldout.txt (it only knows its tasks); for
SmolLM2, calibration on /usr/share/common-licenses/{GPL-3,GFDL-1.3} (16 windows of 512
tokens) and held-out perplexity on Apache-2.0 in 512-token windows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LICENSES = Path("/usr/share/common-licenses")


def tiny_default():
    """The tiny default architecture as the `tiny_trained` test fixture builds it (cached)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_TEST_STEPS, build_tiny_cached

    build = build_tiny_cached(steps=TINY_TEST_STEPS)
    return build.model, [build.tasks / "corpus.txt"], [build.tasks / "heldout.txt"]


def smollm2():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from smollm2 import smollm2_checkpoint

    return smollm2_checkpoint(), [LICENSES / "GPL-3", LICENSES / "GFDL-1.3"], [LICENSES / "Apache-2.0"]


# The rows after RTN: each step of the search, then GPTQ. (label, AWQConfig fields); a row whose
# fields the CLI has no option for runs through the library in a child process of this script.
STEPS = [
    ("AWQ + GPTQ (--method awq+gptq)", {"method": "awq+gptq"}),
    ("AWQ, wave 1 (11 α, x only)", {"alpha_steps": 10, "duo_scaling": False}),
    ("AWQ, 21 α x+duo (--method awq)", {"method": "awq"}),
    ("GPTQ (--method gptq)", {"method": "gptq"}),
    ("AWQ + GPTQ --act-order", {"method": "awq+gptq", "act_order": True}),
]
CLI_FIELDS = {"method": "--method", "act_order": "--act-order"}


def run(model: Path, out: Path, calib: list[Path], heldout: list[Path], extra: list[str],
        eval_length: int, fields: dict | None = None) -> dict:
    """One `orstack awq` process (or, for `fields` the CLI has no option for, one library call in
    a child process): wall time, its own peak RSS, the manifest's metrics, sizes."""
    fields = dict(fields or {})
    flags = []
    for key in [k for k in fields if k in CLI_FIELDS]:
        value = fields.pop(key)
        flags += [CLI_FIELDS[key]] if value is True else [CLI_FIELDS[key], str(value)]
    cmd = [sys.executable, "-m", "orstack", "--quiet", "awq", str(model), "-o", str(out),
           "--eval-length", str(eval_length), *extra, *flags]
    for p in calib:
        cmd += ["--calib", str(p)]
    for p in heldout:
        cmd += ["--heldout", str(p)]
    if fields:
        cmd = [sys.executable, __file__, "--child", json.dumps({"fields": fields, "argv": cmd[3:]})]
    start = time.perf_counter()
    # One thread: on a shared, loaded machine OpenMP's second thread mostly waits (results are
    # identical at 1 and 2 threads; tests/test_awq.py checks it).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    metrics = json.loads((out / "orstack.json").read_text())["metrics"]
    print(f"done: {out.name} ppl {metrics.get('ppl_before')} -> {metrics.get('ppl_after')} in {seconds:.0f} s, "
          f"peak {usage.ru_maxrss / 1024:.0f} MB", file=sys.stderr, flush=True)
    return {"out": out, "metrics": metrics, "seconds": seconds, "peak_mb": usage.ru_maxrss / 1024,
            "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")), "linear_bytes": linear_bytes(out)}


def child(spec: str) -> None:
    """Run `orstack awq ARGV` with AWQConfig `fields` the CLI does not expose overridden: the
    command's own parsing, then the same library call with those fields replaced."""
    import dataclasses

    import orstack.awq
    import orstack.awq.stage
    from orstack.cli import main as cli_main

    job = json.loads(spec)
    real_run = orstack.awq.stage.run

    def patched(source, output, config, runtime):  # noqa: ANN001, ANN202 - the stage's own signature
        return real_run(source, output, dataclasses.replace(config, **job["fields"]), runtime)

    orstack.awq.run = patched
    sys.argv = ["orstack", *job["argv"]]
    cli_main()


def linear_bytes(path: Path) -> int:
    """Bytes of the decoder layers' Linear tensors as stored (benchmarks/compose.py's count,
    which also knows the sparse 4-bit layout's uint8 masks and indices)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compose import linear_bytes as stored_linear_bytes

    return stored_linear_bytes(path)


def answer_ppl(checkpoint: Path, tasks: Path) -> float:
    """Perplexity of the answer + EOS tokens given BOS + prompt: the tiny default's training
    objective (it is trained on nothing else, so perplexity over whole texts mostly measures
    tokens it never learned to predict)."""
    import math

    import torch

    from orstack.io.checkpoint import load_model
    from orstack.io.jsonl import read_jsonl
    from orstack.tiny.model import collate, encode_example

    torch.set_num_threads(1)
    model, tokenizer = load_model(checkpoint)
    examples = [encode_example(tokenizer, row["prompt"], row["answer"]) for row in read_jsonl(tasks)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            ids, labels = collate(examples[start:start + 64], tokenizer.pad_token_id or 0)
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = labels[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return math.exp(nll / count)


def bench(name: str, model: Path, calib: list[Path], heldout: list[Path], group: int, calib_args: list[str],
          eval_length: int, work: Path, mixed: bool, tasks: Path | None = None,
          steps: list[int] | None = None) -> list[list[str]]:
    # --force: the rows are measured, not gated (RTN's perplexity rise fails the 97% gate)
    common = ["--bits", "4", "--group-size", str(group), "--force", *calib_args]
    runs = {}
    # The slow rows first and RTN last, each printed as soon as it is known: on a loaded machine
    # a run that is stopped early still leaves its finished rows.
    for i, (label, fields) in enumerate(STEPS):
        if steps is None or i in steps:
            runs[label] = run(model, work / f"{name}-{i}", calib, heldout, common, eval_length, fields)
    runs = {"RTN": run(model, work / f"{name}-rtn", [], heldout, ["--rtn", *common], eval_length), **runs}
    if mixed:
        runs["AWQ mixed 3/4/5"] = run(model, work / f"{name}-mixed", calib, heldout, [*common, "--mixed-precision"],
                                      eval_length)
    # The quality figure the gap is measured on: held-out text perplexity, or for the tiny
    # default its answer perplexity on held-out tasks (see answer_ppl).
    if tasks is not None:
        dense = answer_ppl(model, tasks)
        for r in runs.values():
            r["quality"] = answer_ppl(r["out"], tasks)
    else:
        dense = runs["RTN"]["metrics"]["ppl_before"]
        for r in runs.values():
            r["quality"] = r["metrics"]["ppl_after"]
    dense_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rows = [[name, "original (fp32)", f"{runs['RTN']['metrics']['ppl_before']:.3f}", f"{dense:.3f}", "",
             f"{dense_bytes / 1e6:.1f}", "", "", ""]]
    rtn = runs["RTN"]["quality"]
    for method, r in runs.items():
        gap = "" if method == "RTN" else f"{(rtn - r['quality']) / (rtn - dense):.1%}" if rtn > dense else "n/a"
        bits = r["metrics"].get("average_bits", 4)
        rows.append([name, f"{method} {bits:g}b g{group}", f"{r['metrics']['ppl_after']:.3f}", f"{r['quality']:.3f}",
                     gap, f"{r['bytes'] / 1e6:.1f}", f"{r['linear_bytes'] / 1e6:.2f}", f"{r['seconds']:.0f}",
                     f"{r['peak_mb']:.0f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny default only, 8 calibration windows")
    ap.add_argument("--only", choices=["tiny", "smollm2"], help="run one model")
    ap.add_argument("--no-mixed", action="store_true", help="skip the --mixed-precision run")
    ap.add_argument("--steps", help="comma-separated indices into STEPS to run after RTN (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    steps = [int(i) for i in args.steps.split(",")] if args.steps else None
    header = ["model", "method", "held-out text ppl", "quality ppl", "RTN gap closed", "weights MB", "linears MB",
              "time s", "peak MB"]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="awq-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "tiny"):
            model, calib, heldout = tiny_default()
            tasks = heldout[0].with_suffix(".jsonl")
            n = ["--nsamples", "8" if args.quick else "64", "--seqlen", "64" if args.quick else "128"]
            rows += bench("tiny", model, calib, heldout, 128, n, 128, work, not args.no_mixed, tasks, steps)
        if args.only in (None, "smollm2") and not args.quick:
            model, calib, heldout = smollm2()
            rows += bench("SmolLM2-135M", model, calib, heldout, 64, ["--nsamples", "16", "--seqlen", "512"], 512,
                          work, not args.no_mixed, steps=steps)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
