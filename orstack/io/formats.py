"""Special checkpoint formats written by orstack stages, each registered in a few lines.

Imported lazily by `orstack.io.checkpoint.detect_format`. Append one block per format:
`register_format(name, "module:loader", lazy("module:detector"))`; `lazy` defers each
stage's import until a checkpoint is actually inspected.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from orstack.io.checkpoint import register_format


def lazy(ref: str) -> Callable[[Path], bool]:
    """A detector that imports "module:function" on first use."""
    def detect(path: Path) -> bool:
        module, func = ref.split(":")
        return bool(getattr(importlib.import_module(module), func)(path))

    return detect


# prune: pruned linear weights stored as bitmask + kept values (docs/prune.md)
register_format("orstack-sparse-bitmask", "orstack.prune.storage:load_sparse",
                lazy("orstack.prune.storage:is_sparse_checkpoint"), reader="orstack.prune.storage:sparse_reader")

# awq of a sparse prune output: pack-quantized codes of the kept weights only, 2:4 or bitmask (docs/awq.md)
register_format("orstack-sparse-pack-quantized", "orstack.awq.packed:load_packed",
                lazy("orstack.awq.packed:is_sparse_packed"), reader="orstack.awq.packed:packed_reader")

# awq: compressed-tensors "pack-quantized" int3/4/8 weights, dequantized on load (docs/awq.md)
register_format("compressed-tensors-pack-quantized", "orstack.awq.packed:load_packed",
                lazy("orstack.awq.packed:is_packed"), reader="orstack.awq.packed:packed_reader")

# distill/rl: a LoRA adapter directory (adapter_config.json): base from orstack.json "base" + the adapter
register_format("lora-adapter", "orstack.train.lora:load_adapter",
                lambda path: path.is_dir() and (path / "adapter_config.json").is_file())

# zstd-pack: a .orz pack of a checkpoint directory, unpacked once into a digest-keyed cache to load it
# whole; config and tokenizer come from its small files alone, and streamed stages read its tensors
# one at a time without unpacking (docs/zstd-pack.md)
register_format("orz-pack", "orstack.zstd_pack.load:load_packed_model",
                lambda path: path.is_file() and path.suffix == ".orz",
                tokenizer="orstack.zstd_pack.load:cached_config_files", reader="orstack.zstd_pack.lazy:pack_reader",
                streams="orstack.zstd_pack.lazy:pack_streams")
