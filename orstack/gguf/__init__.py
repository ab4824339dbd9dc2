"""GGUF export: a checkpoint as a file llama.cpp runs, validated against its source.

`run(source, output, GgufConfig(...), runtime)` (orstack/gguf/stage.py) is the whole stage;
export.py writes the file, validate.py compares it with the source in llama.cpp,
metadata.py keeps the orstack manifest in the file's metadata.
"""

from orstack.gguf.export import TYPES
from orstack.gguf.stage import GgufConfig, GgufResult, check_config, run

__all__ = ["TYPES", "GgufConfig", "GgufResult", "check_config", "run"]
