"""cluster-failures: group failed examples into capability gaps (embed, k-means, c-TF-IDF)."""

from orstack.cluster_failures.failures import (
    ClusterConfig,
    ClusterResult,
    annotated_rows,
    cluster_failures,
    plot_clusters,
)

__all__ = ["ClusterConfig", "ClusterResult", "annotated_rows", "cluster_failures", "plot_clusters"]
