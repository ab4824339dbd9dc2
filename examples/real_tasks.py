#!/usr/bin/env python3
"""The real-model task suite (orstack/tasks/suites.py) as two JSONL files, for examples/real-model.mk.

    python examples/real_tasks.py --a heldout-a.jsonl --b heldout-b.jsonl --per-cell 6 --humaneval 8 \
        --corpus suite.txt --code-corpus code.txt --code-from 100

Half A is what the pipeline learns from (failures, router), half B what it is judged on;
both are chat tasks (`messages`). --corpus writes half A's questions and answers as text
(vocab-trim keeps their tokens), --code-corpus the prompts and canonical solutions of
HumanEval problems --code-from onward (keep it disjoint from the problems evaluated).
Same arguments, same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orstack.tasks import suites


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="half A (learn from)")
    ap.add_argument("--b", type=Path, required=True, help="half B (judge on)")
    ap.add_argument("--per-cell", type=int, default=suites.SuiteConfig.per_cell)
    ap.add_argument("--humaneval", type=int, default=suites.SuiteConfig.humaneval)
    ap.add_argument("--families", default=",".join(suites.SuiteConfig.families))
    ap.add_argument("--max-new-tokens", type=int, default=suites.SuiteConfig.max_new_tokens)
    ap.add_argument("--code-max-new-tokens", type=int, default=suites.SuiteConfig.code_max_new_tokens)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--code-corpus", type=Path)
    ap.add_argument("--code-from", type=int, default=100)
    args = ap.parse_args()
    config = suites.SuiteConfig(per_cell=args.per_cell, humaneval=args.humaneval,
                                families=tuple(f for f in args.families.split(",") if f),
                                max_new_tokens=args.max_new_tokens, code_max_new_tokens=args.code_max_new_tokens,
                                seed=args.seed)
    if args.humaneval and args.code_from < 2 * args.humaneval:
        ap.error(f"--code-from {args.code_from} overlaps the {2 * args.humaneval} problems evaluated")
    problems = suites.humaneval_problems() if args.humaneval or args.code_corpus else []
    a, b = suites.make_suite(config, problems)
    suites.write_jsonl(a, args.a)
    suites.write_jsonl(b, args.b)
    if args.corpus:
        args.corpus.write_text(suites.as_text(a), encoding="utf-8")
    if args.code_corpus:
        args.code_corpus.write_text("\n\n".join(p["prompt"] + p["canonical_solution"]
                                                for p in problems[args.code_from:]), encoding="utf-8")
    print(f"{args.a}: {len(a)} tasks, {args.b}: {len(b)} tasks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
