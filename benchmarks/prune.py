"""Pruning side by side: magnitude vs Wanda vs SparseGPT, 50% unstructured and 2:4.

For each model (the tiny default and SmolLM2-135M) every method prunes with the same
calibration windows and is scored on the same held-out text. Each run is a separate
process, so its peak memory (max RSS, including loading the model) is its own. Every
pruned model is written in orstack's sparse layout, read back through orstack's loader,
and its 2:4 pattern checked on every decoder matrix of the reloaded weights.

    python benchmarks/prune.py            # tiny default + SmolLM2-135M
    python benchmarks/prune.py --quick    # tiny default only, fewer calibration windows
    python benchmarks/prune.py --models smollm2

Texts: the tiny default calibrates on its own corpus.txt and is scored by answer perplexity
on the first 1,000 rows of its heldout.jsonl (answer + EOS tokens given the prompt: the only
tokens it was trained to predict; text perplexity on heldout.txt is also recorded);
SmolLM2 uses licence texts shipped in the environment: calibration = the licence files of
transformers (Apache-2.0), hypothesis (MPL-2.0) and pillow; held-out = the first 8,000
characters of matplotlib's licence agreement (a different, non-repetitive text).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RUNS = [("magnitude", None), ("wanda", None), ("sparsegpt", None),
        ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4")]
HELDOUT_CHARS = 8000


def site_file(pattern: str) -> Path:
    import site

    for root in site.getsitepackages():
        found = sorted(Path(root).glob(pattern))
        if found:
            return found[0]
    raise SystemExit(f"no file matches {pattern} in site-packages")


def tiny_checkpoint() -> tuple[Path, Path]:
    """The trained tiny default as the tests build it (seed 0, 400 steps: the same model the
    other compression benchmarks use) and its task directory, from the shared cache
    (tests/conftest.py: ~/.cache/orstack/tiny-<source digest>-seed0-steps400)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import TINY_TEST_STEPS, build_tiny_cached

    built = build_tiny_cached(steps=TINY_TEST_STEPS, seed=0)
    return built.model, built.tasks


def model_setups(quick: bool, models: list[str]) -> list[dict]:
    setups = []
    if "tiny" in models:
        model, tasks = tiny_checkpoint()
        setups.append({"name": "tiny default", "model": str(model),
                       "calib": [str(tasks / "corpus.txt")], "heldout": str(tasks / "heldout.txt"),
                       "answers": str(tasks / "heldout.jsonl"),
                       "nsamples": 8 if quick else 64, "seqlen": 64, "eval_length": 128})
    if "smollm2" in models and not quick:
        from smollm2 import smollm2_checkpoint

        setups.append({"name": "SmolLM2-135M", "model": str(smollm2_checkpoint()),
                       "calib": [str(site_file("transformers-*.dist-info/licenses/LICENSE")),
                                 str(site_file("hypothesis-*.dist-info/licenses/LICENSE.txt")),
                                 str(site_file("pillow-*.dist-info/licenses/LICENSE"))],
                       "heldout": str(site_file("matplotlib-*.dist-info/LICENSE")),
                       "nsamples": 16, "seqlen": 256, "eval_length": 512})
    return setups


def answer_ppl(model, tok, path: str, limit: int = 1000) -> float:  # noqa: ANN001 - HF model, tokenizer
    """exp(mean NLL) of answer + EOS tokens given BOS + prompt, over held-out task rows: what the
    tiny default was trained to predict (its loss covers answers only, so it never learned to
    predict prompts, and plain text perplexity on them is in the thousands)."""
    import math

    import torch
    import torch.nn.functional as F

    from orstack.io.jsonl import read_jsonl
    from orstack.tiny.model import IGNORE, collate, encode_example

    rows = [r for _, r in zip(range(limit), read_jsonl(path, required=("prompt", "answer")))]
    examples = [encode_example(tok, r["prompt"], str(r["answer"])) for r in rows]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 100):
            ids, labels = collate(examples[start:start + 100], tok.pad_token_id)
            logits = model(input_ids=ids).logits
            nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                         ignore_index=IGNORE, reduction="sum"))
            count += int((labels[:, 1:] != IGNORE).sum())
    return math.exp(nll / count)


def one_run(setup: dict, method: str | None, pattern: str | None) -> dict:
    """In the child process: prune (or not, for the dense row), score, store, reload, verify."""
    import torch

    from orstack.backends.perplexity import perplexity
    from orstack.console import set_quiet
    from orstack.io.checkpoint import load_model
    from orstack.io.text import read_texts, token_windows
    from orstack.prune.core import PruneSpec, masks_of, prune_model
    from orstack.prune.masks import check_nm, parse_pattern
    from orstack.prune.storage import save_sparse

    set_quiet(True)
    torch.manual_seed(0)
    torch.set_num_threads(setup["threads"])
    model, tok = load_model(setup["model"])
    heldout = [Path(setup["heldout"]).read_text(encoding="utf-8")[:HELDOUT_CHARS]]
    result: dict = {"model": setup["name"], "method": method or "dense", "pattern": pattern or ""}
    seconds = 0.0
    if method is not None:
        ids = token_windows(tok, list(read_texts(setup["calib"])), setup["nsamples"], setup["seqlen"], seed=0)
        spec = PruneSpec(method=method, sparsity=0.5, pattern=parse_pattern(pattern) if pattern else None)
        start = time.perf_counter()
        report = prune_model(model, ids, spec)
        seconds = time.perf_counter() - start
        result["sparsity"] = report.sparsity
        with tempfile.TemporaryDirectory() as tmp:
            sizes = save_sparse(model, Path(tmp), set(masks_of(model)))
            model.config.save_pretrained(tmp)
            reloaded, _ = load_model(tmp, with_tokenizer=False)
            for name, module in reloaded.named_modules():
                if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                    assert torch.equal(module.weight, model.get_submodule(name).weight), name
                    if pattern:
                        check_nm(module.weight.detach(), *parse_pattern(pattern), name=name)
        result["size_fraction"] = sizes["stored_bytes"] / sizes["dense_bytes"]
        result["pattern_verified"] = bool(pattern)
    result["seconds"] = seconds
    result["text_ppl"] = perplexity(model, tok, heldout, max_length=setup["eval_length"]).ppl
    result["ppl"] = answer_ppl(model, tok, setup["answers"]) if "answers" in setup else result["text_ppl"]
    return result


def run_child(setup: dict, method: str | None, pattern: str | None) -> dict:
    """One run in its own process; its max RSS comes from wait4."""
    args = [sys.executable, __file__, "--one", json.dumps([setup, method, pattern])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"run {setup['name']} {method} {pattern} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024
    return result


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<14} {'method':<10} {'pattern':<8} {'sparsity':>8} {'held-out ppl':>12} "
          f"{'prune s':>8} {'peak MB':>8} {'file/dense':>10} {'2:4 ok':>6}")
    for r in rows:
        sparsity = f"{r['sparsity']:.3f}" if "sparsity" in r else "-"
        size = f"{r['size_fraction']:.1%}" if "size_fraction" in r else "100%"
        check = "yes" if r.get("pattern_verified") else "-"
        print(f"{r['model']:<14} {r['method']:<10} {r['pattern'] or 'unstr.':<8} {sparsity:>8} {r['ppl']:>12.2f} "
              f"{r['seconds']:>8.1f} {r['peak_mb']:>8.0f} {size:>10} {check:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny default only, 8 calibration windows")
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: fastest on a loaded "
                        "2-core machine)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        setup, method, pattern = json.loads(args.one)
        print(json.dumps(one_run(setup, method, pattern)))
        return
    rows = []
    for setup in model_setups(args.quick, args.models.split(",")):
        setup["threads"] = args.threads
        print(f"# {setup['name']}: {setup['nsamples']} calibration windows x {setup['seqlen']} tokens, "
              f"held-out ppl with {setup['eval_length']}-token windows", file=sys.stderr, flush=True)
        for method, pattern in [(None, None), *RUNS]:
            rows.append(run_child(setup, method, pattern))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
