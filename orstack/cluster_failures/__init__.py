"""cluster-failures: group failed examples into capability gaps (embed, k-means, c-TF-IDF).

    from orstack.cluster_failures import ClusterConfig, run
    run("results.jsonl", "clusters.jsonl", ClusterConfig(embedder="tfidf"), Runtime(), annotate="failures.jsonl")
"""

from orstack.cluster_failures.failures import (
    ClusterConfig,
    ClusterResult,
    annotated_rows,
    cluster_failures,
    plot_clusters,
)
from orstack.cluster_failures.stage import run

__all__ = ["ClusterConfig", "ClusterResult", "annotated_rows", "cluster_failures", "plot_clusters", "run"]
