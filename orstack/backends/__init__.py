"""Backends: one interface to a model's generation and log-likelihoods, whatever runs it.

base.py is the Backend protocol and `open_backend` (a MODEL spec -> a backend); hf.py runs
checkpoints with transformers, llamacpp.py runs GGUF files with llama.cpp; perplexity.py
holds the windows and definitions both use. Everything that asks a model something (bench,
teachers, route, gguf validation, tiny evaluation) goes through here.
"""

from orstack.backends.base import Backend, Generation, open_backend

__all__ = ["Backend", "Generation", "open_backend"]
