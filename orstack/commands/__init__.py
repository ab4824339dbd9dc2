"""The CLI skin: one module per subcommand, each exposing `register(app)`.

Modules here import only typer and orstack's light modules at import time; the
heavy libraries (torch, transformers, ...) are imported inside the command bodies,
so `orstack --help` and completion answer instantly.
"""

# The order of the pipeline, used for `orstack --help`; modules not listed come after.
PIPELINE_ORDER = [
    "tiny", "bench", "vocab_trim", "cluster_failures", "distill", "prune", "awq",
    "gguf", "zstd_pack", "rl", "merge", "route",
]
