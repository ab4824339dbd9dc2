"""Composition: prune 50% -> awq against awq alone, on disk (issue 21's sparse 4-bit).

Rows per model, each stage its own `orstack` process, the same calibration and held-out text:
- awq alone (the dense model, 4 bit, group 64): pack-quantized;
- prune --sparsity 0.5 (Wanda) -> awq: the sparse 4-bit layout (bitmask + kept codes);
- prune --pattern 2:4 (Wanda) -> awq: the 2:4 layout (2 codes + 2-bit indices per group of 4);
- the same 50% prune written --no-compress -> awq: the same weights in the dense pack-quantized
  layout, which is what `prune -> awq` stored before (zeros packed as int4 like any value).
Columns: all weight files, the decoder Linears alone (codes, masks, scales, zero points), the
ratio to awq alone, held-out perplexity after the step (manifest), wall time of the awq step.

    python benchmarks/compose.py                 # tiny default and SmolLM2-135M
    python benchmarks/compose.py --tiny-only
    python benchmarks/compose.py --rtn           # round-to-nearest instead of AWQ (sizes are the same)

Text: the tiny default's corpus.txt / heldout.txt; SmolLM2: calibration on
/usr/share/common-licenses/GPL-3, held-out perplexity on Apache-2.0.
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
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def tiny_default() -> tuple[Path, list[Path], list[Path]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_TEST_STEPS, build_tiny_cached

    build = build_tiny_cached(steps=TINY_TEST_STEPS)
    return build.model, [build.tasks / "corpus.txt"], [build.tasks / "heldout.txt"]


def smollm2() -> tuple[Path, list[Path], list[Path]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from smollm2 import smollm2_checkpoint

    return smollm2_checkpoint(), [LICENSES / "GPL-3"], [LICENSES / "Apache-2.0"]


def orstack(*args: str) -> float:
    """Run one orstack command (one torch thread: on a loaded machine the second mostly waits);
    returns its wall time."""
    env = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "orstack", "--quiet", *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"orstack {' '.join(args)} failed:\n{p.stderr}")
    return time.perf_counter() - start


def linear_bytes(path: Path) -> int:
    """Bytes of the decoder layers' Linear tensors as stored (codes, masks, scales, zero points)."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if ".layers." in key and "_proj." in key:
                    t = st.get_slice(key)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total += n * DTYPE_BYTES[t.get_dtype()]
    return total


def bench(name: str, model: Path, calib: list[Path], heldout: list[Path], work: Path, args: argparse.Namespace,
          ) -> list[dict]:
    text = [a for p in calib for a in ("--calib", str(p))] + [a for p in heldout for a in ("--heldout", str(p))]
    sizes = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-length", str(args.seqlen)]
    quant = ["--rtn"] if args.rtn else []
    prunes = {"awq alone": None,
              "prune 50% -> awq": ["--sparsity", "0.5"],
              "prune 2:4 -> awq": ["--pattern", "2:4"],
              "prune 50% --no-compress -> awq": ["--sparsity", "0.5", "--no-compress"]}
    rows = []
    for label, prune in prunes.items():
        source = model
        if prune is not None:
            source = work / f"{name}-{label.split(' ->')[0].replace(' ', '_').replace('%', '')}"
            orstack("prune", str(model), "-o", str(source), "--method", "wanda", *prune, *text, *sizes, "--force")
        out = work / f"{name}-{label.replace(' ', '_').replace('>', '').replace('%', '')}"
        seconds = orstack("awq", str(source), "-o", str(out), "--group-size", str(args.group), *quant, *text,
                          *sizes, "--force")
        manifest = json.loads((out / "orstack.json").read_text())
        rows.append({"model": name, "row": label, "format": manifest.get("weights_format"),
                     "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                     "linear_bytes": linear_bytes(out), "ppl": manifest["metrics"].get("ppl_after"),
                     "ppl_dense": manifest["metrics"].get("ppl_before") if prune is None else None,
                     "seconds": seconds, "files": sorted(f.name for f in out.glob("*.safetensors"))})
        print(f"done: {name} {label}: {rows[-1]['bytes'] / 1e6:.2f} MB in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<14} {'row':<32} {'weights MB':>10} {'linears MB':>10} {'vs awq':>7} {'ppl':>9} "
          f"{'awq s':>6}  format")
    for r in rows:
        alone = next(x for x in rows if x["model"] == r["model"] and x["row"] == "awq alone")
        print(f"{r['model']:<14} {r['row']:<32} {r['bytes'] / 1e6:>10.2f} {r['linear_bytes'] / 1e6:>10.2f} "
              f"{r['bytes'] / alone['bytes']:>7.3f} {r['ppl'] or float('nan'):>9.3f} "
              f"{r['seconds']:>6.0f}  {r['format']}")
    for r in rows:
        if r["ppl_dense"] is not None:
            print(f"{r['model']}: dense (unquantized) held-out perplexity {r['ppl_dense']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-only", action="store_true")
    parser.add_argument("--rtn", action="store_true", help="round-to-nearest instead of AWQ (same layout and sizes)")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    models = [("tiny default", *tiny_default())]
    if not args.tiny_only:
        models.append(("SmolLM2-135M", *smollm2()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="orstack-compose-") as tmp:
        for name, model, calib, heldout in models:
            rows += bench(name.split()[0], model, calib, heldout, Path(tmp), args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print_table(rows)


if __name__ == "__main__":
    main()
