"""Router features: the base model's own signals, the prompt's length and domain, and a
prompt embedding (character tf-idf reduced by SVD, or sentence-transformers).

The fitted featuriser is stored as plain arrays and JSON (no pickle), and rebuilt at
load time; transforming one row takes well under a millisecond with tf-idf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orstack.errors import BadInput
from orstack.tasks.contract import text_of

SIGNALS = ("mean_logprob", "min_logprob", "mean_entropy", "output_tokens")
N_SIGNALS = len(SIGNALS) + 1  # and the prompt length (signal_vector)


def load_results(path: str, *, signals: bool = True) -> list[dict]:
    """Result rows for routing, checked line by line: a unique `id`, a boolean (or null) `correct`
    and, with `signals`, the base model's numeric signals (errors name file:line and field)."""
    from orstack.io.jsonl import display_name, read_jsonl_numbered

    name = display_name(path)
    rows: list[dict] = []
    first_line: dict[Any, int] = {}
    for lineno, row in read_jsonl_numbered(path, required=("id", "correct")):
        where = f"{name}:{lineno}"
        check_row(row, where, signals=signals)
        key = row["id"] if isinstance(row["id"], (str, int)) else repr(row["id"])
        if key in first_line:
            raise BadInput(f"{where}: field 'id': duplicate id {row['id']!r} (first on line {first_line[key]})")
        first_line[key] = lineno
        rows.append(row)
    return rows


def check_row(row: dict, where: str, *, signals: bool = True) -> None:
    """One Result row: a boolean (or null) `correct` and, with `signals`, the numeric signals."""
    if row.get("correct") is not None and not isinstance(row["correct"], bool):
        raise BadInput(f"{where}: field 'correct' must be true or false, got {row['correct']!r}")
    for name in SIGNALS if signals else ():
        value = row.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BadInput(f"{where}: field '{name}': expected a number (route needs bench Result rows from the "
                           "base model)")


def signal_vector(row: dict) -> list[float]:
    prompt_tokens = row.get("prompt_tokens")
    if not isinstance(prompt_tokens, (int, float)):
        prompt_tokens = len(text_of(row))
    return [
        float(row["mean_logprob"]),
        float(row["min_logprob"]),
        float(row["mean_entropy"]),
        math.log1p(float(row["output_tokens"])),
        math.log1p(float(prompt_tokens)),
    ]


@dataclass
class Featurizer:
    embedder: str = "tfidf"  # tfidf | none | minilm | a sentence-transformers model directory
    svd_dims: int = 16
    domains: list[str] = field(default_factory=list)
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    tfidf_vocabulary: dict[str, int] | None = None
    tfidf_idf: np.ndarray | None = None
    svd_components: np.ndarray | None = None
    _vectorizer: Any = None

    # -- fitting -------------------------------------------------------------
    def fit(self, rows: list[dict]) -> Featurizer:
        self.domains = sorted({str(r.get("domain")) for r in rows if r.get("domain") is not None})
        if self.embedder == "tfidf":
            self._fit_tfidf([text_of(r) for r in rows])
        raw = self._raw(rows)
        self.mean = raw.mean(axis=0)
        self.scale = raw.std(axis=0) + 1e-6
        return self

    def _fit_tfidf(self, prompts: list[str]) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), max_features=4000, sublinear_tf=True)
        matrix = vectorizer.fit_transform(prompts)
        dims = max(1, min(self.svd_dims, matrix.shape[1] - 1, len(prompts) - 1))
        svd = TruncatedSVD(n_components=dims, random_state=0).fit(matrix)
        self.tfidf_vocabulary = {k: int(v) for k, v in vectorizer.vocabulary_.items()}
        self.tfidf_idf = vectorizer.idf_.astype(np.float64)
        self.svd_components = svd.components_.astype(np.float64)
        self._vectorizer = vectorizer

    # -- transforming --------------------------------------------------------
    def _embedding(self, prompts: list[str]) -> np.ndarray:
        if self.embedder == "none":
            return np.zeros((len(prompts), 0))
        if self.embedder == "tfidf":
            tfidf = self._tfidf().transform(prompts)
            return np.asarray(tfidf @ self.svd_components.T)
        from orstack.cluster_failures.embed import resolve_embedder, sentence_embed  # shared with cluster-failures

        return np.asarray(sentence_embed(prompts, resolve_embedder(self.embedder)))

    def _tfidf(self):
        if self._vectorizer is None:
            from sklearn.feature_extraction.text import TfidfVectorizer

            vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True,
                                         vocabulary=self.tfidf_vocabulary)
            vectorizer.idf_ = self.tfidf_idf
            self._vectorizer = vectorizer
        return self._vectorizer

    def _raw(self, rows: list[dict]) -> np.ndarray:
        signals = np.array([signal_vector(r) for r in rows], dtype=np.float64)
        domains = np.array([[1.0 if str(r.get("domain")) == d else 0.0 for d in self.domains] for r in rows])
        domains = domains.reshape(len(rows), len(self.domains))
        embedding = self._embedding([text_of(r) for r in rows])
        return np.hstack([signals, domains, embedding])

    def transform(self, rows: list[dict]) -> np.ndarray:
        return (self._raw(rows) - self.mean) / self.scale

    # -- storage -------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        out = {"featurizer.mean": self.mean, "featurizer.scale": self.scale}
        if self.embedder == "tfidf":
            out["featurizer.tfidf_idf"] = self.tfidf_idf
            out["featurizer.svd_components"] = self.svd_components
        return out

    def config(self) -> dict[str, Any]:
        return {"embedder": self.embedder, "svd_dims": self.svd_dims, "domains": self.domains,
                "tfidf_vocabulary": self.tfidf_vocabulary}

    @classmethod
    def restore(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Featurizer:
        return cls(embedder=config["embedder"], svd_dims=config["svd_dims"], domains=config["domains"],
                   mean=arrays["featurizer.mean"], scale=arrays["featurizer.scale"],
                   tfidf_vocabulary=config.get("tfidf_vocabulary"), tfidf_idf=arrays.get("featurizer.tfidf_idf"),
                   svd_components=arrays.get("featurizer.svd_components"))
