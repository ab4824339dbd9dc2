"""Group failed examples into capability gaps: embed, k-means, c-TF-IDF labels.

`cluster_failures(rows, config)` takes the rows (bench Result rows or any dicts) and returns
one Cluster row per cluster plus each row's cluster, independent of the rows' order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orstack.cluster_failures.ctfidf import cluster_keywords, keyword_label
from orstack.cluster_failures.embed import check_embedder, embed, embedder_name, resolve_embedder, row_text
from orstack.cluster_failures.kmeans import kmeans_clusters
from orstack.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

FLAG_BELOW = 0.3  # clusters with a mean silhouette below this are loose: flagged for a human look


@dataclass
class ClusterConfig:
    fields: list[str] = field(default_factory=lambda: ["prompt", "output"])
    k: int | None = None  # None: choose by silhouette over 2..k_max
    k_max: int = 20
    n_init: int = 20
    embedder: str = "minilm"  # minilm, tfidf or a sentence-transformers model directory
    labeler: str | None = None  # http://HOST:PORT/v1#MODEL
    only_failures: bool = True
    n_representatives: int = 20
    n_keywords: int = 5
    seed: int = 0

    def check(self) -> None:
        """The options alone make sense (BadInput naming the option otherwise), before any row is read."""
        from orstack.cluster_failures.labeler import parse_labeler

        if not self.fields or not all(isinstance(f, str) and f for f in self.fields):
            raise BadInput("--fields: name at least one field, e.g. prompt,output")
        if self.k is not None and self.k < 1:
            raise BadInput(f"-k: must be at least 1, got {self.k}")
        if self.k_max < 2:
            raise BadInput(f"--k-max: expected at least 2, got {self.k_max}")
        if self.n_init < 1:
            raise BadInput(f"--n-init: expected at least 1, got {self.n_init}")
        check_embedder(self.embedder)
        if self.labeler:
            parse_labeler(self.labeler)


@dataclass
class ClusterResult:
    clusters: list[dict[str, Any]]  # Cluster rows (DESIGN.md)
    assignments: list[int]  # cluster of each kept row, in input order
    kept: list[int]  # positions (in the input) of the rows that were clustered
    embeddings: np.ndarray  # in input order of the kept rows
    silhouette: float | None
    k_scores: dict[int, float]
    n_input: int


def select_failures(rows: Sequence[dict[str, Any]], only_failures: bool,
                    where: Sequence[str] | None = None) -> list[int]:
    """Positions of the rows to cluster: those with `correct` false (or absent) by default.
    A `correct` that is not a boolean (the string "no", say) is bad input naming the row."""
    if not only_failures:
        return list(range(len(rows)))
    kept = []
    for i, row in enumerate(rows):
        correct = row.get("correct")
        if correct is not None and not isinstance(correct, bool):
            at = where[i] if where is not None else f"row {i + 1}"
            raise BadInput(f"{at}: field 'correct' must be true or false, got "
                           f"{json.dumps(correct, ensure_ascii=False)[:60]} (--all clusters every row)")
        if not correct:
            kept.append(i)
    return kept


def canonical_order(texts: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[int]:
    """A content-defined order, so shuffled input gives bit-identical embeddings and clusters."""
    def key(i: int) -> tuple[str, str]:
        digest = hashlib.sha256(texts[i].encode("utf-8")).hexdigest()
        return digest, json.dumps(rows[i], sort_keys=True, ensure_ascii=False, default=str)

    return sorted(range(len(texts)), key=key)


def row_id(row: dict[str, Any], position: int) -> str:
    value = row.get("id")
    return str(value) if value is not None else f"row-{position + 1}"


def cluster_failures(rows: Sequence[dict[str, Any]], config: ClusterConfig,
                     where: Sequence[str] | None = None, source: str = "input", device: str = "cpu") -> ClusterResult:
    """Cluster the failing rows. `where[i]` names row i in error messages (file:line), `source` the
    input; a sentence-transformers embedder runs on `device`."""
    import numpy as np

    from orstack.console import info

    where = where or [f"row {i + 1}" for i in range(len(rows))]
    kept = select_failures(rows, config.only_failures, where)
    if not kept:
        what = "no rows" if not rows else f"no failures among {len(rows)} rows (all have correct=true; use --all)"
        raise BadInput(f"{source}: {what}")
    texts = [row_text(rows[i], config.fields, where[i]) for i in kept]
    embedder = resolve_embedder(config.embedder)
    order = canonical_order(texts, [rows[i] for i in kept])
    canon_texts = [texts[j] for j in order]
    info(f"embedding {len(texts):,} rows with {embedder_name(embedder)}")
    x = embed(canon_texts, embedder, device=device)
    if config.k is not None and config.k > len(texts):
        from orstack.console import warn

        warn(f"-k {config.k} is more than the {len(texts)} rows; using at most {len(texts)} clusters")
    result = kmeans_clusters(x, config.k, k_max=config.k_max, n_init=config.n_init, seed=config.seed)
    labels = result.labels
    k = len(result.centers)
    keywords = cluster_keywords(canon_texts, labels.tolist(), k, config.n_keywords)
    canon_ids = [row_id(rows[kept[j]], kept[j]) for j in order]
    clusters = []
    ask_labeler = bool(config.labeler)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        dist = np.linalg.norm(x[members] - result.centers[c], axis=1)
        nearest = members[np.lexsort((members, dist))][: config.n_representatives]
        label = keyword_label(keywords[c])
        if ask_labeler:
            from orstack.cluster_failures.labeler import try_llm_label

            llm = try_llm_label(config.labeler, [canon_texts[j] for j in nearest], keywords[c])
            ask_labeler = llm is not None  # an endpoint that failed once is not asked again
            label = llm or label
        sil = result.silhouettes[c]
        clusters.append({
            "cluster": c, "label": label, "keywords": keywords[c], "size": int(len(members)),
            "silhouette": None if sil is None else round(sil, 4),
            "representatives": [canon_ids[j] for j in nearest],
            "flagged": sil is not None and sil < FLAG_BELOW,
        })
    assignments = [0] * len(kept)
    embeddings = np.empty_like(x)
    for canon_pos, j in enumerate(order):
        assignments[j] = int(labels[canon_pos])
        embeddings[j] = x[canon_pos]
    return ClusterResult(clusters=clusters, assignments=assignments, kept=kept, embeddings=embeddings,
                         silhouette=result.silhouette, k_scores=result.k_scores, n_input=len(rows))


def annotated_rows(rows: Sequence[dict[str, Any]], result: ClusterResult) -> list[dict[str, Any]]:
    """Each clustered row, in input order, with `cluster` and `cluster_label` added."""
    labels = {c["cluster"]: c["label"] for c in result.clusters}
    return [{**rows[i], "cluster": c, "cluster_label": labels[c]} for i, c in zip(result.kept, result.assignments)]


def plot_clusters(result: ClusterResult, path: str, title: str = "failure clusters") -> None:
    """A 2-D PCA projection of the embeddings, coloured by cluster, written as PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.decomposition import PCA

    from orstack.io.atomic import atomic_path

    x = result.embeddings
    if len(x) > 2 and x.shape[1] > 1:
        xy = PCA(n_components=2).fit_transform(x)
    else:  # too few rows for a projection: place them on a line
        xy = np.column_stack([np.arange(len(x)), np.zeros(len(x))])
    labels = np.asarray(result.assignments)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    cmap = plt.get_cmap("tab20")
    for c in result.clusters:
        m = labels == c["cluster"]
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(c["cluster"] % 20),
                   label=f"{c['cluster']}: {c['label'][:40]} ({c['size']})")
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
