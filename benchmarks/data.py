"""The data stages measured: vocab-trim (tiny default, SmolLM2-135M) and cluster-failures
(the tiny default's real failures; 10,000 rows), each printed as one small table.

    python benchmarks/data.py            # everything (~15-25 min on 2 loaded cores)
    python benchmarks/data.py --quick    # one coverage for SmolLM2, MiniLM skipped at 10k rows
    python benchmarks/data.py --only vocab|cluster [--coverages 0.995,1.0]

Corpora (all on disk, nothing downloaded):
- tiny default: its own tasks/corpus.txt (training distribution) and tasks/heldout.txt.
- SmolLM2-135M: English prose from /usr/share/common-licenses (12 licences) and the text files
  Python 3.11's idlelib ships (NEWS, NEWS2x, HISTORY, TODO, CREDITS, extend), 309 KB; held out:
  GPL-2, MPL-2.0 and idlelib/README.txt (46 KB).
BERTopic is measured only if importable from $BERTOPIC_PATH (a throw-away `pip install --target`
directory, never the project's environment).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LICENSES = Path("/usr/share/common-licenses")
IDLELIB = Path(sysconfig.get_paths()["stdlib"]) / "idlelib"
CORPUS_LICENSES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-3", "LGPL-2",
                   "LGPL-2.1", "LGPL-3", "MPL-1.1")
CORPUS_IDLE = ("NEWS.txt", "NEWS2x.txt", "HISTORY.txt", "TODO.txt", "CREDITS.txt", "extend.txt")
HELDOUT = (LICENSES / "GPL-2", LICENSES / "MPL-2.0", IDLELIB / "README.txt")


def tiny_default() -> Path:
    """The tiny default (1000 steps, seed 0), cached as the test fixture caches it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_cached

    return build_tiny_cached(steps=1000)


def english_corpus(workdir: Path) -> tuple[Path, Path]:
    idle = IDLELIB if IDLELIB.is_dir() else Path("/root/.pyenv/versions/3.11.7/lib/python3.11/idlelib")
    sources = [LICENSES / n for n in CORPUS_LICENSES] + [idle / n for n in CORPUS_IDLE]
    heldout = [LICENSES / "GPL-2", LICENSES / "MPL-2.0", idle / "README.txt"]
    corpus, held = workdir / "english-corpus.txt", workdir / "english-heldout.txt"
    corpus.write_text("".join(p.read_text(encoding="utf-8", errors="replace") for p in sources), encoding="utf-8")
    held.write_text("".join(p.read_text(encoding="utf-8", errors="replace") for p in heldout), encoding="utf-8")
    return corpus, held


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def orstack(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "orstack", "--quiet", *args], capture_output=True, text=True, env=env)


# ------------------------------------------------------------------------------ vocab-trim

def trim_once(name: str, model: Path, corpus: Path, heldout: Path, out: Path, coverage: str, max_length: int) -> dict:
    start = time.perf_counter()
    p = orstack("vocab-trim", str(model), "--corpus", str(corpus), "--validate", str(heldout), "--coverage", coverage,
                "--max-length", str(max_length), "--force", "-o", str(out))
    seconds = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"vocab-trim failed on {name}: {p.stderr.strip()[-500:]}")
    m = json.loads((out / "orstack.json").read_text())["metrics"]
    return {**m, "name": name, "coverage_target": coverage, "seconds": seconds,
            "gate": "FAIL" if "quality gate failed" in p.stderr else "pass",
            "bytes_before": weights_bytes(model), "bytes_after": weights_bytes(out)}


def vocab_rows(quick: bool, workdir: Path, coverages: list[str]) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from smollm2 import smollm2_checkpoint

    tiny = tiny_default()
    rows = [trim_once("tiny default", tiny.model, tiny.tasks / "corpus.txt", tiny.tasks / "heldout.txt",
                      workdir / "tiny-trim", "0.995", 128)]
    smol = smollm2_checkpoint()
    corpus, heldout = english_corpus(workdir)
    for coverage in coverages[:1] if quick else coverages:
        out = workdir / f"smol-trim-{coverage}"
        rows.append(trim_once("SmolLM2-135M", smol, corpus, heldout, out, coverage, 256 if quick else 512))
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return rows


def print_vocab(rows: list[dict]) -> None:
    print("\nvocab-trim (orstack, --force so every row is written; gate = round trip 100%, tokens/word +5%, "
          "bits/byte +3%)")
    head = ("model", "coverage", "vocab", "params", "file", "round trip", "same tokens: corpus lines (all kept)",
            "same tokens: held-out lines", "tokens/word", "bits/byte", "gate", "time")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([
            r["name"], f"{r['coverage_target']} (got {r['coverage']:.4f})",
            f"{r['vocab_before']:,} -> {r['vocab_after']:,}",
            f"{r['params_before'] / 1e6:.2f}M -> {r['params_after'] / 1e6:.2f}M "
            f"(-{1 - r['params_after'] / r['params_before']:.1%})",
            f"{r['bytes_before'] / 1e6:.1f} -> {r['bytes_after'] / 1e6:.1f} MB "
            f"(-{1 - r['bytes_after'] / r['bytes_before']:.1%})",
            f"{r['round_trip']:.2%}", f"{r['corpus_agreement']:.2%} ({r['corpus_agreement_kept']:.2%})",
            f"{r['heldout_agreement']:.2%}",
            f"{r['tokens_per_word_before']:.3f} -> {r['tokens_per_word_after']:.3f}",
            f"{r['bits_per_byte_before']:.4f} -> {r['bits_per_byte_after']:.4f}",
            r["gate"], f"{r['seconds']:.0f} s"]))


# ------------------------------------------------------------------------------ cluster-failures

def tiny_failures(workdir: Path) -> list[dict]:
    tiny = tiny_default()
    results = workdir / "results.jsonl"
    p = orstack("bench", str(tiny.model), "--tasks", str(tiny.tasks / "heldout.jsonl"), "-o", str(results))
    if p.returncode != 0:
        raise SystemExit(f"orstack bench failed: {p.stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return [r for r in rows if r.get("correct") is False]


def synthetic_failures(n: int, seed: int = 0) -> list[dict]:
    """Failure-like rows from the tiny task generators: the prompt, and a wrong answer (one
    character changed) as the output."""
    from orstack.tiny.tasks import GENERATORS, LEVELS

    rng = random.Random(seed)
    cells = [(f, lv) for f in GENERATORS for lv in LEVELS]
    rows = []
    for i in range(n):
        family, level = cells[i % len(cells)]
        prompt, answer = GENERATORS[family](rng, level)
        chars = list(answer)
        j = rng.randrange(len(chars))
        chars[j] = rng.choice([c for c in "0123456789abcdefghij<>=" if c != chars[j]])
        rows.append({"id": f"syn-{i}", "prompt": prompt, "output": "".join(chars), "answer": answer,
                     "correct": False, "family": family, "level": level})
    return rows


def bertopic_assignments(texts: list[str], minilm: Path) -> tuple[list[int], float] | None:
    path = os.environ.get("BERTOPIC_PATH")
    if not path:
        return None
    sys.path.append(path)
    try:
        from bertopic import BERTopic
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"(BERTopic not importable from {path}: {type(e).__name__}: {e})", file=sys.stderr)
        return None
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    topics, _ = BERTopic(embedding_model=SentenceTransformer(str(minilm), device="cpu")).fit_transform(texts)
    return list(topics), time.perf_counter() - start


def cluster_rows(failures: list[dict], quick: bool) -> list[dict]:
    from sklearn.metrics import adjusted_rand_score

    from orstack.cluster_failures import ClusterConfig, cluster_failures
    from orstack.cluster_failures.embed import find_minilm, row_text

    family = [r["family"] for r in failures]
    cell = [f"{r['family']}-{r['level']}" for r in failures]
    n_cells = len(set(cell))
    rows = []
    for embedder in ("minilm", "tfidf"):
        for k in (None, 7, n_cells):
            start = time.perf_counter()
            result = cluster_failures(failures, ClusterConfig(embedder=embedder, k=k))
            rows.append({"method": f"orstack {embedder}", "k": f"auto={len(result.clusters)}" if k is None else k,
                         "ari_family": adjusted_rand_score(family, result.assignments),
                         "ari_cell": adjusted_rand_score(cell, result.assignments),
                         "flagged": sum(c["flagged"] for c in result.clusters), "outliers": 0,
                         "seconds": time.perf_counter() - start})
    texts = [row_text(r, ["prompt", "output"], "row") for r in failures]
    bt = bertopic_assignments(texts, find_minilm())
    if bt is not None:
        topics, seconds = bt
        rows.append({"method": "BERTopic (defaults, MiniLM)", "k": len(set(topics) - {-1}),
                     "ari_family": adjusted_rand_score(family, topics), "ari_cell": adjusted_rand_score(cell, topics),
                     "flagged": "-", "outliers": sum(t == -1 for t in topics), "seconds": seconds})
    return rows


def print_cluster(rows: list[dict], n: int, source: str) -> None:
    print(f"\ncluster-failures on {n:,} {source} (ARI against the generating family / family+level)")
    head = ("method", "k", "ARI family", "ARI family+level", "flagged", "outliers", "time")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([r["method"], str(r["k"]), f"{r['ari_family']:.3f}", f"{r['ari_cell']:.3f}",
                          str(r["flagged"]), str(r["outliers"]), f"{r['seconds']:.1f} s"]))


def timing_rows(quick: bool, n: int) -> list[dict]:
    """Wall and CPU time of the whole pipeline (embed, choose k, k-means, silhouettes, labels);
    CPU time is what a busy shared machine does not distort."""
    from orstack.cluster_failures import ClusterConfig, cluster_failures

    rows = synthetic_failures(n)
    out = []
    for embedder in ("tfidf",) if quick else ("tfidf", "minilm"):
        start, cpu = time.perf_counter(), time.process_time()
        result = cluster_failures(rows, ClusterConfig(embedder=embedder, k=None))
        out.append({"embedder": embedder, "k": len(result.clusters), "seconds": time.perf_counter() - start,
                    "cpu": time.process_time() - cpu})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("vocab", "cluster", "timing"))
    parser.add_argument("--timing-rows", type=int, default=10_000)
    parser.add_argument("--coverages", default="0.995,0.9995,1.0", help="SmolLM2 coverages to trim at")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from orstack.console import set_quiet

    set_quiet(True)
    with tempfile.TemporaryDirectory(prefix="orstack-bench-data-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "cluster"):
            failures = tiny_failures(workdir)
            print_cluster(cluster_rows(failures, args.quick), len(failures), "real failures of the tiny default")
        if args.only in (None, "cluster", "timing"):
            print(f"\ntime to cluster {args.timing_rows:,} failure-like rows (tiny task generators, -k auto, "
                  "whole pipeline)")
            print("embedder | k chosen | wall | CPU")
            print("--- | --- | --- | ---")
            for r in timing_rows(args.quick, args.timing_rows):
                print(f"{r['embedder']} | {r['k']} | {r['seconds']:.1f} s | {r['cpu']:.1f} s", flush=True)
        if args.only in (None, "vocab"):
            print_vocab(vocab_rows(args.quick, workdir, args.coverages.split(",")))


if __name__ == "__main__":
    main()
