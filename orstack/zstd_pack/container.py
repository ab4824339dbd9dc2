"""The .orz container: a chunked, indexed, seekable zstd pack of files.

Layout (all integers little-endian):

    offset 0        header   16 bytes   b"ORZPACK\\0", u32 version (1), u32 flags (0)
    16              frames   ...        stored frames, back to back (zstd frames with a
                                        content checksum, or planes stored as is)
    dict_offset     dict     ...        the zstd dictionary, raw (optional)
    index_offset    index    ...        zstd-compressed UTF-8 JSON (below)
    end - 56        trailer  56 bytes   b"ORZINDEX", u64 index_offset, u64 index_length,
                                        32-byte SHA-256 of the index bytes

The index:

    {"format": "orstack-pack", "version": 1, "root": "file" | "dir",
     "config": {...PackConfig...}, "config_class": "orstack.zstd_pack.writer:PackConfig",
     "data_sha256": SHA-256 of bytes [0, index_offset),
     "dict": null | {"offset", "length", "sha256", "gain_bytes"},
     "files": [{"path", "size", "sha256", "kind": "safetensors" | "gguf" | "opaque",
                "segments": [{"name", "offset", "size", "dtype", "shape", "blob"}]}],
     "blobs": [{"sha256", "size", "transform",
                "chunks": [{"offset", "size", "frames": [[method, stored_length], ...]}]}]}

A file is the concatenation of its segments (header, tensors, padding), each pointing to
a blob: the segment's bytes, identified by their SHA-256, so identical tensors are stored
once. A blob is cut into chunks of `chunk_size` bytes; a chunk of a float blob is split
into byte planes (codec.py), one frame per plane; frame method 0 = stored, 1 = zstd,
2 = zstd with the dictionary. Reading one tensor touches only its blob's frames.

Integrity: every byte of a pack is covered by a checksum, so one changed byte anywhere is
found by every reader. The trailer's SHA-256 covers the index; the index's `data_sha256`
covers everything before it (header, frames, dictionary); the trailer checks itself (magic,
and an index that must end where the trailer starts). zstd frames carry checksums, and every
blob's and every file's SHA-256 is checked when it is read back, so damage is named by the
tensor and file it hits. Any mismatch, a truncated file or a missing trailer is BadInput
(exit 2). Packs written before `data_sha256` existed get the per-tensor and per-file checks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import zstandard as zstd

from orstack.errors import BadInput

MAGIC = b"ORZPACK\0"
VERSION = 1
HEADER = struct.Struct("<8sII")
TRAILER_MAGIC = b"ORZINDEX"
TRAILER = struct.Struct("<8sQQ32s")


def write_header(fh: BinaryIO) -> None:
    fh.write(HEADER.pack(MAGIC, VERSION, 0))


def write_index(fh: BinaryIO, index: dict[str, Any]) -> str:
    """Append the compressed index and the trailer; return the index digest."""
    blob = zstd.ZstdCompressor(level=9, write_checksum=True).compress(json.dumps(index, separators=(",", ":")).encode())
    offset = fh.tell()
    fh.write(blob)
    digest = hashlib.sha256(blob).digest()
    fh.write(TRAILER.pack(TRAILER_MAGIC, offset, len(blob), digest))
    return digest.hex()


def is_pack(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_index(fh: BinaryIO, where: str) -> tuple[dict[str, Any], str, int]:
    """(index, digest, index_offset) of an open pack, checked against the trailer; BadInput if
    damaged. The data section is [0, index_offset)."""
    fh.seek(0, 2)
    size = fh.tell()
    fh.seek(0)
    head = fh.read(HEADER.size)
    if len(head) < HEADER.size or head[: len(MAGIC)] != MAGIC:
        raise BadInput(f"{where}: not an orstack pack (no ORZPACK header)")
    _, version, flags = HEADER.unpack(head)
    if version != VERSION:
        raise BadInput(f"{where}: pack format version {version} is not supported (this orstack reads {VERSION})")
    if flags != 0:
        raise BadInput(f"{where}: corrupted pack (header flags {flags:#x}, expected 0)")
    if size < HEADER.size + TRAILER.size:
        raise BadInput(f"{where}: truncated pack (no trailer)")
    fh.seek(size - TRAILER.size)
    magic, offset, length, digest = TRAILER.unpack(fh.read(TRAILER.size))
    # The index ends where the trailer starts: no byte of a pack lies outside a checksum.
    if magic != TRAILER_MAGIC or not HEADER.size <= offset <= offset + length == size - TRAILER.size:
        raise BadInput(f"{where}: truncated or corrupted pack (bad trailer)")
    fh.seek(offset)
    blob = fh.read(length)
    if hashlib.sha256(blob).digest() != digest:
        raise BadInput(f"{where}: corrupted pack (index checksum mismatch)")
    try:
        index = json.loads(zstd.ZstdDecompressor().decompress(blob))
    except (zstd.ZstdError, ValueError) as e:
        raise BadInput(f"{where}: corrupted pack index ({e})") from None
    _check_index(index, offset, where)
    return index, digest.hex(), offset


def _check_index(index: Any, data_end: int, where: str) -> None:
    """Structural checks, so a damaged or hostile index cannot make us read or write astray."""
    try:
        if index["format"] != "orstack-pack":
            raise ValueError("format")
        blobs = index["blobs"]
        for b in blobs:
            for c in b["chunks"]:
                stored = sum(n for _, n in c["frames"])
                if c["offset"] < HEADER.size or c["offset"] + stored > data_end:
                    raise ValueError("chunk outside the data section")
            if sum(c["size"] for c in b["chunks"]) != b["size"]:
                raise ValueError("blob size")
        for f in index["files"]:
            p = Path(f["path"])
            if p.is_absolute() or ".." in p.parts or not f["path"]:
                raise ValueError(f"unsafe path {f['path']!r}")
            pos = 0
            for s in f["segments"]:
                if s["offset"] != pos or blobs[s["blob"]]["size"] != s["size"]:
                    raise ValueError(f"segments of {f['path']}")
                pos += s["size"]
            if pos != f["size"]:
                raise ValueError(f"size of {f['path']}")
        if index["root"] not in ("file", "dir") or (index["root"] == "file" and len(index["files"]) != 1):
            raise ValueError("root")
        if not isinstance(index.get("data_sha256", ""), str):
            raise ValueError("data_sha256")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise BadInput(f"{where}: corrupted pack index ({e})") from None
