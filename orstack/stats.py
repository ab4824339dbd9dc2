"""The statistics that say whether a difference between two models is real: a seeded paired
bootstrap, McNemar's exact test, and the KL divergence of next-token distributions.

Pure numpy and the standard library, in the lowest layer, so bench, route and the stages'
gates share one home for them. Every random choice is a `numpy.random.default_rng(seed)`
stream: the same seed gives the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK = 1000  # resamples drawn at once: bounds memory at _CHUNK x n indices


def resample_indices(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index arrays [k, n] (k <= _CHUNK rows each, n_resamples rows in all), drawn
    with replacement. Drawing in chunks consumes the generator exactly as one
    `rng.integers(0, n, size=(n_resamples, n))` call would, so chunking never changes a result."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        k = min(_CHUNK, n_resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile bootstrap interval: the (1-c)/2 and (1+c)/2 quantiles of the resampled values."""
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_bootstrap(differences: np.ndarray, *, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval for the mean of per-item differences (model - reference on the same tasks):
    tasks are resampled, each keeping both models' answers, so the interval is as narrow as
    the pairing allows (two independent bootstraps would count the shared task difficulty twice)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan
    means = np.concatenate([d[idx].mean(axis=1) for idx in resample_indices(d.size, n_resamples, seed)])
    return percentile_interval(means, confidence)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, *,
                       n_resamples: int = 1000, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of any statistic of n items: `statistic(indices)` is evaluated on each resample
    of the item indices (a statistic undefined on a resample returns nan and is left out)."""
    if n == 0:
        return math.nan, math.nan
    values = np.array([statistic(row) for idx in resample_indices(n, n_resamples, seed) for row in idx])
    values = values[np.isfinite(values)]
    return percentile_interval(values, confidence) if values.size else (math.nan, math.nan)


def mcnemar_exact(gained: int, lost: int) -> float:
    """McNemar's exact two-sided p-value: only the discordant tasks carry evidence, and under
    "no difference" each flip is a fair coin, so p = P(a Binomial(b + c, 1/2) is at least as
    far from (b + c) / 2 as the observed split). Exact integer arithmetic: no overflow."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(P_reference || Q) in nats per row (position), from log-probabilities over one vocabulary:
    how much of the reference's next-token distribution a model loses, flips included, which
    perplexity averages away. Tokens the reference gives zero probability contribute nothing."""
    p_log = np.asarray(reference_logprobs, dtype=np.float64)
    q_log = np.asarray(logprobs, dtype=np.float64)
    p = np.exp(p_log)
    terms = np.where(p > 0, p * (p_log - q_log), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)  # rounding can leave -1e-17 for identical rows
