"""`orstack cluster-failures`: group failed examples into capability gaps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import Output, current_runtime
from orstack.errors import BadInput

HELP = """Group failed examples (bench Result rows with correct=false, or any JSONL) into clusters.

Embeds the --fields of each row (all-MiniLM-L6-v2, found offline, or --embedder tfidf),
clusters with k-means (k-means++, --n-init restarts; -k auto picks k by silhouette),
labels each cluster by its most distinctive terms (class-based TF-IDF) and flags clusters
whose mean silhouette is below 0.3. Rows are put in a content-defined order first, so
shuffled input gives the same clusters. Writes one Cluster row per cluster (label,
keywords, size, silhouette, the 20 representatives nearest the centroid); --annotate
writes every clustered row with `cluster` and `cluster_label` added.

Example:

\b
    orstack cluster-failures results.jsonl -o clusters.jsonl \\
        --annotate failures.jsonl -k auto --plot clusters.png
"""


def parse_k(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        k = int(value)
    except ValueError:
        raise BadInput(f"-k: expected a number or 'auto', got '{value}'") from None
    if k < 1:
        raise BadInput(f"-k: must be at least 1, got {k}")
    return k


def parse_fields(value: str) -> list[str]:
    fields = [f.strip() for f in value.split(",") if f.strip()]
    if not fields:
        raise BadInput("--fields: name at least one field, e.g. prompt,output")
    return fields


def cluster_failures(
    failures: Annotated[str, typer.Argument(help="Result rows or any JSONL ('-' for standard input).")],
    output: Output = None,
    annotate: Annotated[
        Path | None, typer.Option("--annotate", help="Write every clustered row with cluster and cluster_label.")
    ] = None,
    fields: Annotated[str, typer.Option("--fields", help="Comma-separated fields to embed.")] = "prompt,output",
    k: Annotated[str, typer.Option("-k", help="Number of clusters, or 'auto' (best silhouette).")] = "auto",
    k_max: Annotated[int, typer.Option("--k-max", min=2, help="Largest k tried by -k auto.")] = 20,
    n_init: Annotated[int, typer.Option("--n-init", min=1, help="k-means++ restarts; the best is kept.")] = 20,
    embedder: Annotated[
        str, typer.Option("--embedder", help="minilm, tfidf, or a sentence-transformers model directory.")
    ] = "minilm",
    labeler: Annotated[
        str | None, typer.Option("--labeler", help="OpenAI-compatible endpoint for labels: http://HOST:PORT/v1#MODEL.")
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a 2-D projection PNG coloured by cluster.")] = None,
    only_failures: Annotated[
        bool, typer.Option("--only-failures/--all", help="Cluster only rows with correct=false (when present).")
    ] = True,
) -> None:
    from orstack.cluster_failures import ClusterConfig, run

    runtime = current_runtime()
    config = ClusterConfig(fields=parse_fields(fields), k=parse_k(k), k_max=k_max, n_init=n_init, embedder=embedder,
                           labeler=labeler, only_failures=only_failures, seed=runtime.seed)
    _summary(run(failures, output, config, runtime, annotate=annotate, plot=plot))


def _summary(result) -> None:  # noqa: ANN001 - ClusterResult, imported lazily
    overall = "-" if result.silhouette is None else f"{result.silhouette:.3f}"
    console.info(f"{len(result.kept):,} of {result.n_input:,} rows clustered into {len(result.clusters)} clusters "
                 f"(mean silhouette {overall})")
    if result.k_scores:
        scores = ", ".join(f"{k}:{s:.3f}" for k, s in result.k_scores.items())
        console.info(f"silhouette by k: {scores}")
    tbl = console.new_table("cluster", "size", "silhouette", "flagged", "label", title="failure clusters")
    for c in result.clusters:
        sil = "-" if c["silhouette"] is None else f"{c['silhouette']:.3f}"
        tbl.add_row(str(c["cluster"]), str(c["size"]), sil, "yes" if c["flagged"] else "", c["label"])
    tbl.columns[-1].justify = "left"
    console.table(tbl)


def register(app: typer.Typer) -> None:
    app.command("cluster-failures", help=HELP)(cluster_failures)
