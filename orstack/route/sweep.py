"""Routing quality against cost: threshold sweeps and RouteLLM's APGR / CPT.

With a weak (fast) and a strong (accurate) answer for each query and the router's
P(fast answer is correct):
- PGR(share) = (accuracy when the `share` least-confident queries go to the strong path
  - weak accuracy) / (strong accuracy - weak accuracy): the performance gap recovered;
- APGR = the area under PGR over strong-call share in [0, 1] (random routing: 0.5);
- CPT(x) = the smallest strong-call share whose PGR reaches x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Outcome:
    p_fast_ok: np.ndarray  # router confidence per query
    fast_correct: np.ndarray  # 0/1
    strong_correct: np.ndarray  # 0/1
    fast_cost: np.ndarray  # e.g. latency of the fast path
    strong_cost: np.ndarray  # extra cost of the strong path


def accuracy_at_threshold(o: Outcome, threshold: float) -> tuple[float, float, float]:
    """(accuracy, strong share, mean cost) when queries with p < threshold go to the strong path.
    The auto path always runs the fast model first, so an escalated query costs both."""
    strong = o.p_fast_ok < threshold
    correct = np.where(strong, o.strong_correct, o.fast_correct)
    cost = o.fast_cost + strong * o.strong_cost
    return float(correct.mean()), float(strong.mean()), float(cost.mean())


def pgr_curve(o: Outcome, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """PGR at strong-call shares 0..1: the least confident queries are escalated first."""
    order = np.argsort(o.p_fast_ok, kind="stable")
    n = len(order)
    weak, strong = o.fast_correct.mean(), o.strong_correct.mean()
    gap = strong - weak
    shares = np.linspace(0.0, 1.0, points)
    pgr = []
    for share in shares:
        k = int(round(share * n))
        routed = o.fast_correct.astype(float).copy()
        routed[order[:k]] = o.strong_correct[order[:k]]
        pgr.append((routed.mean() - weak) / gap if gap > 0 else 0.0)
    return shares, np.array(pgr)


def apgr(o: Outcome) -> float:
    shares, pgr = pgr_curve(o)
    return float(np.trapezoid(pgr, shares))


def cpt(o: Outcome, target: float) -> float:
    """The smallest strong-call share reaching PGR >= target (1.0 if never)."""
    shares, pgr = pgr_curve(o)
    reached = np.nonzero(pgr >= target - 1e-12)[0]
    return float(shares[reached[0]]) if len(reached) else 1.0


def sweep(o: Outcome, thresholds: np.ndarray, cost_weight: float) -> list[dict]:
    """One row per threshold. score = accuracy - cost_weight x (cost / cost of always-strong):
    accuracy bought per unit of relative cost; the default threshold is the best score."""
    full_cost = float((o.fast_cost + o.strong_cost).mean()) or 1.0
    rows = []
    for t in thresholds:
        acc, share, cost = accuracy_at_threshold(o, float(t))
        rows.append({"threshold": round(float(t), 4), "accuracy": acc, "strong_share": share, "cost": cost,
                     "score": acc - cost_weight * cost / full_cost})
    return rows
