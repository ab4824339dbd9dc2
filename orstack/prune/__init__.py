"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M, with sparse storage.

`run(source, output, PruneConfig(...), runtime) -> PruneResult` is the whole stage. Kept free
of heavy imports: orstack/io/formats.py imports the storage module to detect sparse checkpoints.
"""

from orstack.prune.stage import PruneConfig, PruneResult, parse_grid, run

__all__ = ["PruneConfig", "PruneResult", "parse_grid", "run"]
