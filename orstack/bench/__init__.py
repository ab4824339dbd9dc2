"""`orstack bench`: task accuracy, perplexity, speed, memory and size of models, side by side.

backend.py is the interface every model runtime implements (hf.py: transformers;
llamacpp.py: GGUF through llama.cpp); scoring.py and sandbox.py are the verifiers,
shared with rl and distill; runner.py turns tasks into Result rows.
"""
