"""Cheap checks of safetensors weight files, before any weights are read.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON naming each
tensor's dtype, shape and byte range (`data_offsets`, relative to the end of the header),
then the tensor data. A truncated download or a garbage file shows in the header alone, so
every file of a checkpoint is checked in milliseconds instead of failing deep inside a loader
(`SafetensorError`) after minutes of work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from orstack.errors import BadInput

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
INDEX_SUFFIX = ".safetensors.index.json"


def check_safetensors(path: str | Path) -> int:
    """Check the header of one safetensors file against its size; BadInput naming the file.

    Returns the number of tensors described."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n > size - 8:
            raise BadInput(f"{path}: truncated or not a safetensors file (header of {n} bytes in a file of {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    count = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_tensor(path, name, info, data_size)
        count += 1
    return count


def _check_tensor(path: Path, name: str, info: object, data_size: int) -> None:
    try:
        begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[index]
        shape = [int(d) for d in info["shape"]]  # type: ignore[index]
        dtype = str(info["dtype"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise BadInput(f"{path}: corrupted safetensors header (tensor '{name}' has no valid dtype, shape and "
                       "data_offsets)") from None
    if not 0 <= begin <= end:
        raise BadInput(f"{path}: corrupted safetensors header (tensor '{name}' has data_offsets [{begin}, {end}])")
    if end > data_size:
        raise BadInput(f"{path}: truncated (tensor '{name}' ends at data byte {end}, the file holds {data_size})")
    width = DTYPE_BYTES.get(dtype)
    if width is not None and math.prod(shape) * width != end - begin:
        raise BadInput(f"{path}: corrupted safetensors header (tensor '{name}': {dtype} {shape} needs "
                       f"{math.prod(shape) * width} bytes, data_offsets span {end - begin})")


def check_weight_files(directory: str | Path) -> list[Path]:
    """Check every safetensors file of a checkpoint directory, and that a sharded index names
    only shards that exist. Returns the files checked."""
    directory = Path(directory)
    for index in sorted(directory.glob(f"*{INDEX_SUFFIX}")):
        for shard in _index_shards(index):
            if not (directory / shard).is_file():
                raise BadInput(f"{index}: shard {shard} is missing from {directory}")
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    for f in files:
        check_safetensors(f)
    return files


def _index_shards(index: Path) -> set[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{index}: not a safetensors index (JSON with a 'weight_map' object)") from None
    return {str(v) for v in weight_map.values()}
