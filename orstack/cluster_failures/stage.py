"""The cluster-failures stage: `run(rows_path, output, config, runtime, annotate=, plot=)` checks the
options and every output, reads the rows, clusters them and writes the clusters, the annotated
rows and the plot.

The clusters are plain JSONL (one Cluster row per cluster, no header), so the config is not
recorded in them; it is rebuilt from the command line.
"""

from __future__ import annotations

from pathlib import Path

from orstack.cluster_failures.failures import (
    ClusterConfig,
    ClusterResult,
    annotated_rows,
    cluster_failures,
    plot_clusters,
)
from orstack.errors import BadInput
from orstack.io.jsonl import STDIO, check_input_file, display_name, read_jsonl_numbered, write_jsonl
from orstack.io.output import Output, check_outputs
from orstack.runtime import Runtime


def run(rows_path: str | Path, output: str | Path | None, config: ClusterConfig, runtime: Runtime, *,
        annotate: str | Path | None = None, plot: str | Path | None = None) -> ClusterResult:
    """Cluster the failures in `rows_path` (JSONL, `-` for standard input) and write the Cluster
    rows to `output` (standard output when None or `-`), every clustered row with its cluster to
    `annotate`, and a 2-D projection PNG to `plot`."""
    check_input_file(rows_path, allow_empty=True)  # an empty file is reported as "no rows"
    config.check()
    if annotate is not None and str(annotate) == STDIO and (output is None or str(output) == STDIO):
        raise BadInput("--annotate -: standard output already carries the clusters; give -o a file")
    check_outputs([Output(output, "file", "-o"), Output(annotate, "file", "--annotate"),
                   Output(plot, "file", "--plot")], inputs=[rows_path])
    name = display_name(rows_path)
    numbered = list(read_jsonl_numbered(rows_path))
    rows = [row for _, row in numbered]
    where = [f"{name}:{lineno}" for lineno, _ in numbered]
    device = "cpu" if config.embedder == "tfidf" else runtime.torch_device()
    result = cluster_failures(rows, config, where, source=name, device=device)
    write_jsonl(result.clusters, output)
    if annotate is not None:
        write_jsonl(annotated_rows(rows, result), annotate)
    if plot is not None:
        plot_clusters(result, str(plot), title=f"{name}: {len(result.kept):,} rows, {len(result.clusters)} clusters")
    return result
