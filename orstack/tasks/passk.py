"""pass@k: the chance that at least one of k samples of a task is correct (Chen et al., 2021)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k),
    computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def pass_at_k_by_task(rows: Sequence[dict[str, Any]], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean unbiased pass@k over tasks, with rows sharing an id as that task's samples;
    pass@k is reported only when every task has at least k samples."""
    samples: dict[Any, list[bool]] = defaultdict(list)
    for row in rows:
        if row.get("correct") is not None:
            samples[row["id"]].append(bool(row["correct"]))
    if not samples:
        return {}
    fewest = min(len(v) for v in samples.values())
    return {f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in samples.values()) / len(samples)
            for k in ks if k <= fewest}
