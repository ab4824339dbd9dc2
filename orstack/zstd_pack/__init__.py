"""Lossless, seekable packing of checkpoints (`orstack zstd-pack`).

    from orstack.zstd_pack import PackConfig, pack, unpack, verify, list_contents, read_tensor
    pack("model_dir", "model.orz", PackConfig(level=3))
    read_tensor("model.orz", "model.embed_tokens.weight")   # only that tensor is decoded
    with open_pack("model.orz") as tensors:                  # name -> tensor, decoded on access
        w = tensors["model.layers.0.mlp.up_proj.weight"]

The command's entries, which check inputs and outputs first and show progress, are `run`
(pack), `run_unpack`, `run_verify` and `run_list` (orstack/zstd_pack/stage.py). The container
layout is documented in orstack/zstd_pack/container.py and docs/zstd-pack.md.
"""

from orstack.zstd_pack.lazy import PackedTensors, open_pack
from orstack.zstd_pack.load import cached_config_files, cached_unpack, load_packed_model
from orstack.zstd_pack.reader import Pack, UnpackSummary, list_contents, read_tensor, unpack, verify
from orstack.zstd_pack.stage import PackListing, run, run_list, run_unpack, run_verify
from orstack.zstd_pack.writer import PackConfig, PackSummary, pack

__all__ = ["Pack", "PackConfig", "PackListing", "PackSummary", "PackedTensors", "UnpackSummary", "cached_config_files",
           "cached_unpack", "list_contents", "load_packed_model", "open_pack", "pack", "read_tensor", "run", "run_list",
           "run_unpack", "run_verify", "unpack", "verify"]
