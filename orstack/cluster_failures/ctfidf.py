"""Cluster labels without an LLM: class-based TF-IDF (Grootendorst 2022, BERTopic).

All documents of a cluster are treated as one document; a term's weight in cluster c is

    W(t, c) = tf(t, c) * log(1 + A / f(t))

with tf(t, c) the term's frequency in c (L1-normalised per cluster), f(t) its frequency
over all clusters, and A the average number of terms per cluster.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_TERM = re.compile(r"[^\W\d_]{2,}|\d+|[^\w\s]")


def terms(text: str) -> list[str]:
    """Words, operators and numbers; a number becomes its length (`345` -> `3-digit`):
    failures are about digit counts, not the particular digits."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    out = []
    for match in _TERM.finditer(text.lower()):
        term = match.group()
        if term.isdigit():
            out.append(f"{len(term)}-digit")
        elif term not in ENGLISH_STOP_WORDS:
            out.append(term)
    return out


def class_tfidf(counts: np.ndarray) -> np.ndarray:
    """c-TF-IDF weights from a (clusters x terms) count matrix."""
    import numpy as np

    counts = np.asarray(counts, dtype=np.float64)
    per_class = counts.sum(axis=1, keepdims=True)
    tf = np.divide(counts, per_class, out=np.zeros_like(counts), where=per_class > 0)
    term_freq = counts.sum(axis=0)
    avg_terms = counts.sum() / max(len(counts), 1)
    idf = np.log(1.0 + np.divide(avg_terms, term_freq, out=np.zeros_like(term_freq), where=term_freq > 0))
    return tf * idf


def cluster_keywords(texts: Sequence[str], labels: Sequence[int], n_clusters: int, top_n: int = 5) -> list[list[str]]:
    """The `top_n` most distinctive terms of each cluster (ties broken alphabetically).

    Only terms shared by at least 10% of some cluster's rows (and two rows) are candidates:
    a random string found in two rows is not what a cluster is about. Terms in 90% of all
    rows (the `=` of every prompt) distinguish nothing and are left out too.
    """
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer

    grouped: list[list[str]] = [[] for _ in range(n_clusters)]
    doc_freq: list[dict[str, int]] = [{} for _ in range(n_clusters)]
    for text, label in zip(texts, labels):
        grouped[label].append(text)
        for term in set(terms(text)):
            doc_freq[label][term] = doc_freq[label].get(term, 0) + 1
    total: dict[str, int] = {}
    for freq in doc_freq:
        for term, n in freq.items():
            total[term] = total.get(term, 0) + n
    shared = set()
    for group, freq in zip(grouped, doc_freq):
        need = max(2, 0.1 * len(group)) if len(texts) > 1 else 1
        shared |= {t for t, n in freq.items() if n >= need}
    if n_clusters > 1:
        shared -= {t for t, n in total.items() if n >= 0.9 * len(texts)}
    vectorizer = CountVectorizer(analyzer=lambda text: [t for t in terms(text) if t in shared])
    try:
        counts = vectorizer.fit_transform(["\n".join(g) for g in grouped]).toarray()
    except ValueError:  # no shared terms anywhere
        return [[] for _ in range(n_clusters)]
    vocab = vectorizer.get_feature_names_out()  # sorted, so ties break alphabetically
    weights = class_tfidf(counts)
    keywords = []
    for row in weights:
        order = np.argsort(-row, kind="stable")[:top_n]
        keywords.append([str(vocab[i]) for i in order if row[i] > 0])
    return keywords


def keyword_label(keywords: Sequence[str], n: int = 3) -> str:
    return " ".join(keywords[:n]) if keywords else "(no distinctive terms)"
