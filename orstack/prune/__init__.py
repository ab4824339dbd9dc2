"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M, with sparse storage.

Kept free of heavy imports: orstack/io/formats.py imports the storage module to detect
sparse checkpoints.
"""
