"""Using a packed checkpoint directly: unpack once into a cache keyed by the pack file's SHA-256."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from orstack.errors import BadInput
from orstack.zstd_pack.reader import Pack

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def cache_root() -> Path:
    """$ORSTACK_CACHE, else ~/.cache/orstack."""
    return Path(os.environ.get("ORSTACK_CACHE") or Path.home() / ".cache" / "orstack")


def cached_unpack(pack_path: str | Path) -> Path:
    """The unpacked contents of a pack, extracted (and every checksum checked) on first use.

    The cache entry is named by the SHA-256 of the whole pack file, hashed on every use (0.08 s
    per 100 MB on this project's idle 2-core machine, 0.25 s loaded; docs/zstd-pack.md): one
    changed byte anywhere gives a new name, so a damaged pack is never served from the entry of
    the intact one; it is extracted afresh and refused (BadInput naming the pack, and the tensor
    or file the damage hits). Hashing every time, rather than trusting size and mtime, also
    catches damage that keeps the file's metadata (bit rot, a restored mtime). Extraction is
    atomic, so an entry that exists is complete.
    """
    with Pack(pack_path) as p:
        target = cache_root() / "orz" / p.file_sha256()
        if not target.exists():
            p.extract(target)
    return target


# Files a checkpoint's config and tokenizer never are: the weights.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


def cached_config_files(pack_path: str | Path) -> Path:
    """A directory with every file of a packed checkpoint except its weights (config, tokenizer,
    generation config, manifest, safetensors index): what reading the config or the tokenizer
    needs, without decoding the weights (a streamed stage then reads those one at a time).

    Keyed by the digest of the pack's index, which the trailer's SHA-256 checks on every
    open: the index holds the SHA-256 of every file, and each file is checked against it on
    extraction, so an entry holds exactly the files that index names, whatever else in the
    pack is damaged. A single-file pack gives its unpacked file (cached_unpack)."""
    with Pack(pack_path) as p:
        if p.index["root"] != "dir":
            return cached_unpack(pack_path)
        target = cache_root() / "orz-config" / p.digest
        if not target.exists():
            p.extract(target, paths=[f["path"] for f in p.files if not f["path"].endswith(WEIGHT_SUFFIXES)])
    return target


def load_packed_model(path: Path, device: str, dtype: torch.dtype, trust_pickle: bool = False) -> PreTrainedModel:
    """Loader for `.orz` checkpoints (registered in orstack/io/formats.py)."""
    from orstack.io.checkpoint import load_model

    directory = cached_unpack(path)
    if not directory.is_dir():
        raise BadInput(f"{path}: the pack holds a single file, not a checkpoint directory")
    name = str(dtype).removeprefix("torch.")
    model, _ = load_model(directory, device=device, dtype=name, trust_pickle=trust_pickle,
                          with_tokenizer=False)
    return model
