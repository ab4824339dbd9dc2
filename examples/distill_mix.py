"""The demo's distillation data: the teacher's worked examples, some general training rows
mixed in (rehearsal), and never a prompt of the half the result is judged on.

    python distill_mix.py DISTILL.jsonl TRAIN.jsonl HELDOUT_B.jsonl REHEARSAL > data.jsonl

- Rehearsal: the first REHEARSAL rows of TRAIN.jsonl (the tiny's training distribution, Task
  rows; their `answer` becomes the `response`), so fine-tuning on the failing clusters does
  not make the student forget the families it already had right.
- Half B stays unseen: the teacher writes new problems of a failing kind, and for the small
  cells (100 one-digit sums) some of them are half-B prompts; those rows are dropped, so a
  gain on half B is generalisation, not the answers learnt by heart.
Rows are interleaved deterministically (rehearsal rows spread evenly through the data).
"""

from __future__ import annotations

import json
import sys


def read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit(__doc__.split("\n\n")[1].strip())
    distill, train, heldout_b = (read(p) for p in sys.argv[1:4])
    n_rehearsal = int(sys.argv[4])
    judged = {t["prompt"] for t in heldout_b}
    taught = [r for r in distill if r["prompt"] not in judged]
    rehearsal = [{"id": f"rehearsal-{r['id']}", "prompt": r["prompt"], "response": str(r["answer"]),
                  "origin": "rehearsal", "family": r.get("family"), "level": r.get("level")}
                 for r in train if r["prompt"] not in judged][:n_rehearsal]
    rows: list[dict] = []
    step = len(taught) / max(len(rehearsal), 1)
    k = 0
    for i, row in enumerate(taught):
        while k < len(rehearsal) and k * step <= i:
            rows.append(rehearsal[k])
            k += 1
        rows.append(row)
    rows.extend(rehearsal[k:])
    for row in rows:
        print(json.dumps(row))
    print(f"distill data: {len(taught)} taught rows ({len(distill) - len(taught)} dropped: half-B prompts), "
          f"{len(rehearsal)} rehearsal rows", file=sys.stderr)


if __name__ == "__main__":
    main()
