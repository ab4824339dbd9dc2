"""Probability calibration and its measures: Platt scaling, ECE, Brier, log-loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error with equal-width bins: sum over bins of
    (bin share) x |mean confidence - accuracy|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            total += in_bin.mean() * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total)


def chance_ece(p: np.ndarray, bins: int = 10, quantile: float = 0.95, draws: int = 2000, seed: int = 0) -> float:
    """The ECE a perfectly calibrated predictor exceeds with probability 1 - `quantile` on these
    predictions: labels drawn from p itself, `draws` times. ECE is biased upwards on few rows (on
    34 rows spread over [0, 1] its mean is ~0.17 for a calibrated predictor), so a fixed limit
    says nothing until it is above this."""
    rng = np.random.default_rng(seed)
    samples = [ece((rng.random(len(p)) < p).astype(float), p, bins) for _ in range(draws)]
    return float(np.quantile(samples, quantile))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per non-empty bin, for the reliability diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    return [(float(p[index == b].mean()), float(y[index == b].mean()), int((index == b).sum()))
            for b in range(bins) if (index == b).any()]


@dataclass
class Platt:
    """p' = sigmoid(a * logit(p) + b); a=1, b=0 is the identity (temperature scaling is b=0)."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return sigmoid(self.a * logit(p) + self.b)

    @classmethod
    def fit(cls, y: np.ndarray, p: np.ndarray) -> Platt:
        """Minimise log-loss on (y, p); never returns a map worse than the identity there."""
        from scipy.optimize import minimize

        z = logit(p)

        def loss(params: np.ndarray) -> float:
            return log_loss(y, sigmoid(params[0] * z + params[1]))

        identity = cls()
        if len(np.unique(y)) < 2:
            return identity
        best = minimize(loss, x0=np.array([1.0, 0.0]), method="L-BFGS-B")
        fitted = cls(float(best.x[0]), float(best.x[1]))
        return fitted if loss(best.x) <= log_loss(y, p) else identity


def calibration_report(y: np.ndarray, before: np.ndarray, after: np.ndarray, bins: int = 10) -> dict[str, float]:
    return {
        "ece_before": ece(y, before, bins), "ece_after": ece(y, after, bins),
        "brier_before": brier(y, before), "brier_after": brier(y, after),
        "log_loss_before": log_loss(y, before), "log_loss_after": log_loss(y, after),
        "bins": bins,
    }


def plot_reliability(y: np.ndarray, before: np.ndarray, after: np.ndarray, path, bins: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orstack.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for label, probs in (("before", before), ("after", after)):
        points = reliability(y, probs, bins)
        ax.plot([c for c, _, _ in points], [a for _, a, _ in points], marker="o",
                label=f"{label} (ECE {ece(y, probs, bins):.3f})")
    ax.set_xlabel("predicted P(base correct)")
    ax.set_ylabel("observed accuracy")
    ax.set_title("router reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
