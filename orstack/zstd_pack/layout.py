"""Where the tensors are: split a file into segments from its safetensors or GGUF header.

A file's segments cover it exactly, in order, with no overlap: a header segment, one
segment per tensor, and gap segments for any padding between tensors. Float tensors get
their dtype (so the codec can byte-group them); quantized GGUF blocks, integers and
everything else are opaque bytes. A file whose header cannot be parsed is one opaque
segment: packing never fails because a file is not a model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

# safetensors dtype names we byte-group; every other dtype is compressed as is.
SAFETENSORS_FLOATS = {"F64": "F64", "F32": "F32", "F16": "F16", "BF16": "BF16"}
# GGUF (ggml) tensor types that are plain floats: F32=0, F16=1, F64=28, BF16=30.
GGUF_FLOATS = {0: "F32", 1: "F16", 28: "F64", 30: "BF16"}
GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# Sizes of GGUF metadata value types (8 = string, 9 = array are variable).
GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Segment:
    """A byte range [offset, offset + size) of a file, named and typed."""

    name: str
    offset: int
    size: int
    dtype: str = "bytes"  # F32/F16/BF16/F64 for float tensors, else the source dtype or "bytes"
    shape: list[int] = field(default_factory=list)


class LayoutError(ValueError):
    """The header does not describe the file; the file is then packed as opaque bytes."""


def file_layout(data: memoryview) -> tuple[str, list[Segment]]:
    """(kind, segments) of a file's bytes: kind is 'safetensors', 'gguf' or 'opaque'."""
    for kind, parse in (("gguf", _gguf_segments), ("safetensors", _safetensors_segments)):
        try:
            segments = parse(data)
        except (LayoutError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
            continue
        return kind, segments
    return "opaque", [Segment("__data__", 0, len(data))] if len(data) else []


def _cover(tensors: list[Segment], header_size: int, total: int) -> list[Segment]:
    """Header + tensors + gap segments, checked to tile [0, total) exactly."""
    tensors = sorted(tensors, key=lambda s: s.offset)
    out = [Segment("__header__", 0, header_size)]
    pos = header_size
    for t in tensors:
        if t.offset < pos or t.offset + t.size > total:
            raise LayoutError(f"tensor {t.name} overlaps or runs past the end")
        if t.offset > pos:
            out.append(Segment(f"__gap__@{pos}", pos, t.offset - pos))
        if t.size:
            out.append(t)
        pos = t.offset + t.size
    if pos < total:
        out.append(Segment(f"__gap__@{pos}", pos, total - pos))
    return out


def _safetensors_segments(data: memoryview) -> list[Segment]:
    if len(data) < 10:
        raise LayoutError("too short")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > len(data) - 8 or data[8] != ord("{"):
        raise LayoutError("no JSON header")
    header = json.loads(bytes(data[8 : 8 + n]))
    base = 8 + n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = str(info["dtype"])
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise LayoutError(f"bad offsets for {name}")
        tensors.append(Segment(name, base + start, end - start, dtype, [int(d) for d in info["shape"]]))
    return _cover(tensors, base, len(data))


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise LayoutError("header runs past the end")
        self.pos += n

    def string(self) -> bytes:
        n = self.take("<Q")
        self.skip(n)
        return bytes(self.data[self.pos - n : self.pos])

    def value(self, vtype: int) -> object:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in GGUF_SCALAR_SIZES:
                self.skip(GGUF_SCALAR_SIZES[itype] * count)
            else:
                for _ in range(count):
                    self.value(itype)
            return None
        if vtype not in GGUF_SCALAR_SIZES:
            raise LayoutError(f"unknown metadata type {vtype}")
        fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
               12: "<d"}[vtype]
        return self.take(fmt)


def _gguf_segments(data: memoryview) -> list[Segment]:
    """GGUF v2/v3: metadata, tensor infos, aligned data section (ggml's gguf.c layout)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(data[:4]) != GGUF_MAGIC:
        raise LayoutError("no GGUF magic")
    cur = _Cursor(data)
    cur.skip(4)
    if cur.take("<I") not in (2, 3):
        raise LayoutError("unsupported GGUF version")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("<I"))
        if key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8")
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        ttype, offset = cur.take("<I"), cur.take("<Q")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        n = 1
        for d in dims:
            n *= d
        if n % block:
            raise LayoutError(f"tensor {name} is not a whole number of blocks")
        dtype = GGUF_FLOATS.get(ttype, GGMLQuantizationType(ttype).name)
        # ggml lists dimensions fastest-first; torch order is the reverse.
        infos.append((name, offset, n // block * type_size, dtype, dims[::-1]))
    base = -(-cur.pos // alignment) * alignment
    tensors = [Segment(name, base + off, size, dtype, shape) for name, off, size, dtype, shape in infos]
    return _cover(tensors, min(base, len(data)), len(data))
