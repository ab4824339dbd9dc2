"""Cheap checks of GGUF files: magic, version, header and that every tensor fits the file.

A GGUF file is the magic `GGUF`, a version, tensor and key-value counts, the key-value
metadata, one info record per tensor (name, shape, ggml type, offset) and, aligned, the tensor
data. A truncated or foreign file is found by reading the header only (a few MB at most for a
large vocabulary), not half-way through loading (`cannot reshape array`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from orstack.errors import BadInput

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GgufInfo:
    version: int
    tensors: int
    metadata: int  # key-value pairs
    data_start: int
    data_bytes: int  # from data_start to the end of the last tensor


class _Header:
    """Reads the header with a bound on every length, so garbage fails as 'truncated', not
    as a huge allocation."""

    def __init__(self, f: BinaryIO, path: Path, size: int, endian: str) -> None:
        self.f, self.path, self.size, self.endian = f, path, size, endian

    def read(self, n: int, what: str) -> bytes:
        data = self.f.read(n) if n <= self.size else b""
        if len(data) < n:
            raise BadInput(f"{self.path}: truncated GGUF file (ends inside the header, in {what})")
        return data

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        return struct.unpack(self.endian + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = int(self.scalar("Q", what))
        return self.read(n, what).decode("utf-8", errors="replace")

    def value(self, kind: int, what: str) -> object:
        if kind in SCALARS:
            return self.scalar(SCALARS[kind], what)
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            item, count = int(self.scalar("I", what)), int(self.scalar("Q", what))
            if item in SCALARS:  # skip the elements: only their size matters here
                self.read(count * struct.calcsize(SCALARS[item]), what)
                return None
            if item not in (STRING, ARRAY) or count > self.size:
                raise BadInput(f"{self.path}: corrupted GGUF header ({what}: array of unknown type {item})")
            for _ in range(count):
                self.value(item, what)
            return None
        raise BadInput(f"{self.path}: corrupted GGUF header ({what}: unknown value type {kind})")


def _open_header(f: BinaryIO, path: Path, size: int) -> tuple[_Header, int]:
    """(a reader positioned after the version, the version), from the magic and version."""
    if f.read(4) != MAGIC:
        raise BadInput(f"{path}: not a GGUF file (no GGUF magic)")
    raw_version = f.read(4)
    if len(raw_version) < 4:
        raise BadInput(f"{path}: truncated GGUF file (ends inside the header, in the version)")
    endian = "<"
    version = struct.unpack("<I", raw_version)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine
        endian, version = ">", struct.unpack(">I", raw_version)[0]
    if version not in VERSIONS:
        raise BadInput(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    return _Header(f, path, size, endian), version


def read_gguf_values(path: str | Path, keys: set[str]) -> dict[str, object]:
    """The scalar and string metadata values of `keys` (a key that is absent or holds an array
    is left out). gguf.GGUFReader builds an object for every element of every array, which takes
    seconds for a 49k-token vocabulary; this reads the header up to the last key wanted."""
    path = Path(path)
    found: dict[str, object] = {}
    with path.open("rb") as f:
        h, _ = _open_header(f, path, path.stat().st_size)
        h.scalar("Q", "the tensor count")
        for i in range(int(h.scalar("Q", "the metadata count"))):
            if len(found) == len(keys):
                break
            key = h.string(f"metadata key {i}")
            value = h.value(int(h.scalar("I", key)), key)
            if key in keys and value is not None:
                found[key] = value
    return found


def check_gguf(path: str | Path) -> GgufInfo:
    """Check that `path` is a complete GGUF file; BadInput naming the file otherwise."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, expected a .gguf file")
    size = path.stat().st_size
    with path.open("rb") as f:
        h, version = _open_header(f, path, size)
        n_tensors, n_kv = int(h.scalar("Q", "the tensor count")), int(h.scalar("Q", "the metadata count"))
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = h.string(f"metadata key {i}")
            value = h.value(int(h.scalar("I", key)), key)
            if key == "general.alignment" and isinstance(value, int):
                alignment = value
        tensors = []
        for i in range(n_tensors):
            name = h.string(f"tensor info {i}")
            dims = [int(h.scalar("Q", name)) for _ in range(int(h.scalar("I", name)))]
            kind, offset = int(h.scalar("I", name)), int(h.scalar("Q", name))
            tensors.append((name, dims, kind, offset))
        header_end = f.tell()
    if alignment <= 0:
        raise BadInput(f"{path}: corrupted GGUF header (general.alignment {alignment})")
    data_start = -(-header_end // alignment) * alignment
    end_of_data = 0
    for name, dims, kind, offset in tensors:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise BadInput(f"{path}: tensor '{name}' has unknown ggml type {kind}") from None
        end = offset + math.prod(dims) // block * block_bytes
        if data_start + end > size:
            raise BadInput(f"{path}: truncated GGUF file (tensor '{name}' ends at byte {data_start + end}, "
                           f"the file has {size})")
        end_of_data = max(end_of_data, end)
    return GgufInfo(version, len(tensors), n_kv, data_start, end_of_data)
