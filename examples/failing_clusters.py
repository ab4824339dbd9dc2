"""Mark the half-B tasks that fall in a failing cluster found on half A, for the final bench.

    python failing_clusters.py BASE_A.jsonl FAILURES_A.jsonl HELDOUT_B.jsonl > heldout-b-clusters.jsonl

A cluster (cluster-failures on the base's half-A failures) is failing when the base gets fewer
than half of the half-A tasks of the kind it was found on right; the kind of a tiny task is its
(family, level) cell, the unit its generator draws from. Every half-B task of a failing
cluster's cell gets that cluster's `cluster` and `cluster_label` (the fields cluster-failures
annotates with), so bench reports their accuracy apart ("clusters") and compares it model
against model per cluster. Half B itself never informs the choice.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict

FAILING_BELOW = 0.5  # half-A accuracy of a cell below which its cluster counts as failing


def read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cell(row: dict) -> tuple[str, int]:
    return row["family"], row["level"]


def failing_cells(base_a: list[dict], failures: list[dict]) -> dict[tuple[str, int], tuple[int, str]]:
    """{cell: (cluster, label)} for the cells the base fails on half A, each with the cluster
    holding most of its failures (the lower cluster id on a tie)."""
    hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for row in base_a:
        hits[cell(row)].append(bool(row["correct"]))
    clusters: dict[tuple[str, int], Counter] = defaultdict(Counter)
    labels = {}
    for row in failures:
        if row.get("cluster") is not None and row.get("cluster", -1) >= 0:
            clusters[cell(row)][row["cluster"]] += 1
            labels[row["cluster"]] = row.get("cluster_label", str(row["cluster"]))
    chosen = {}
    for c, verdicts in hits.items():
        if sum(verdicts) / len(verdicts) < FAILING_BELOW and clusters[c]:
            cluster = min(clusters[c], key=lambda k: (-clusters[c][k], k))
            chosen[c] = (cluster, labels[cluster])
    return chosen


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[1].strip())
    base_a, failures, heldout_b = (read(p) for p in sys.argv[1:])
    chosen = failing_cells(base_a, failures)
    marked = 0
    for task in heldout_b:
        if cell(task) in chosen:
            task["cluster"], task["cluster_label"] = chosen[cell(task)]
            marked += 1
        print(json.dumps(task))
    names = sorted({label for _, label in chosen.values()})
    print(f"failing clusters of half A: {len(names)} ({', '.join(names)}); {marked} of {len(heldout_b)} "
          "half-B tasks are theirs", file=sys.stderr)


if __name__ == "__main__":
    main()
