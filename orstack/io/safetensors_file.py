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


# ---------------------------------------------------------------------------- streaming

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# safetensors' Dtype enum order, narrowest first: it writes tensors widest first
DTYPE_RANK = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
              "F64", "I64", "U64")
INDEX_FILE = "model" + INDEX_SUFFIX
DEFAULT_SHARD_BYTES = 2 * 1024**3  # writer's shard size: small enough to move, large enough to be few


def find_index(directory: Path) -> Path | None:
    """The sharded index of a checkpoint directory: Hugging Face's `model.safetensors.index.json`,
    else the one other index a format orstack writes under its own name (orstack-sparse...)."""
    if (directory / INDEX_FILE).is_file():
        return directory / INDEX_FILE
    return next(iter(sorted(p for p in directory.glob(f"*{INDEX_SUFFIX}") if p.is_file())), None)


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__ plus the metadata under "__metadata__", byte offset of the data)."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


class TensorReader:
    """Every tensor of a checkpoint directory (one file or index + shards), read one at a time.

    Reads go through `readinto` at the tensor's byte offset rather than through a memory map:
    pages of a map stay counted in the process's resident set until it is unmapped, so a
    mapped 16 GB checkpoint read tensor by tensor ends as a 16 GB process; a read leaves the
    bytes in the page cache, which the kernel can drop, and costs exactly the tensor."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = find_index(self.directory)
        if index is not None:
            files = sorted({self.directory / s for s in _index_shards(index)})
        else:
            files = sorted(p for p in self.directory.glob("*.safetensors") if p.is_file())
        if not files:
            raise BadInput(f"{self.directory}: no weight files (*.safetensors) in the checkpoint")
        self._where: dict[str, tuple[Path, int, dict]] = {}
        self.metadata: dict[str, str] = {}
        self.file_metadata: list[dict[str, str]] = []  # per file, in file order
        for f in files:
            header, start = read_header(f)
            self.file_metadata.append(header.pop("__metadata__", None) or {})
            self.metadata.update(self.file_metadata[-1])
            for name, info in header.items():
                self._where[name] = (f, start, info)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def dtype(self, name: str):  # noqa: ANN201 - torch.dtype
        import torch

        return getattr(torch, SAFETENSORS_DTYPES[self._where[name][2]["dtype"]])

    def get(self, name: str):  # noqa: ANN201 - torch.Tensor
        import torch

        path, start, info = self._where[name]
        begin, end = info["data_offsets"]
        out = torch.empty(tuple(info["shape"]), dtype=self.dtype(name))
        if end > begin:
            with path.open("rb") as f:
                f.seek(start + begin)
                if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != end - begin:
                    raise BadInput(f"{path}: truncated (tensor '{name}')")
        return out

    def nbytes(self) -> int:
        return sum(info["data_offsets"][1] - info["data_offsets"][0] for _, _, info in self._where.values())


class ShardedWriter:
    """Write tensors one at a time into safetensors shards of about `shard_bytes` each, plus
    Hugging Face's index (`model.safetensors.index.json`); a single shard is `model.safetensors`.
    Another `prefix` names the files `<prefix>.safetensors`, `<prefix>-00001-of-00002.safetensors`
    and `<prefix>.safetensors.index.json`: a layout that plain transformers must not load (it looks
    for `model.*` only) is written under a name of its own.

    A shard's header must precede its data, and its size is known only once the shard is
    full, so the data goes to a scratch file first and is copied behind the header when the
    shard closes (the kernel copies it: no tensor is held in memory after its `add`). Tensor
    order inside a shard is the order of `add`; `metadata` goes into every shard's header."""

    def __init__(self, directory: str | Path, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None, prefix: str = "model") -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.metadata = dict(metadata or {})
        self.shards: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total = 0
        self._entries: dict[str, dict] = {}
        self._data = None
        self._size = 0
        # JSON-valued metadata of the shard being written (what its own tensors need), reset per shard
        self.shard_json: dict[str, dict] = {}

    def add(self, name: str, tensor) -> None:  # noqa: ANN001 - torch.Tensor
        import torch

        if name in self.weight_map or name in self._entries:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().cpu().contiguous()
        code = next(k for k, v in SAFETENSORS_DTYPES.items() if getattr(torch, v) == t.dtype)
        nbytes = t.numel() * t.element_size()
        if self._entries and self._size + nbytes > self.shard_bytes:
            self._close_shard()
        self._open_data()
        if nbytes:
            self._data.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._entries[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [self._size, self._size + nbytes]}
        self._size += nbytes
        self.total += nbytes

    def _open_data(self) -> None:
        if self._data is None:
            self._data = (self.directory / f".shard-{len(self.shards):05d}.data").open("w+b")

    def _close_shard(self) -> None:
        import os

        metadata = {**self.metadata, **{k: json.dumps(v) for k, v in self.shard_json.items()}}
        # safetensors' own order (widest dtype first, then name), so a single shard is byte for byte
        # what safetensors.torch.save_file writes for the same tensors and metadata
        order = sorted(self._entries, key=lambda n: (-DTYPE_RANK.index(self._entries[n]["dtype"]), n))
        header: dict = {"__metadata__": dict(sorted(metadata.items()))}
        position, moves = 0, []
        for name in order:
            entry = self._entries[name]
            begin, end = entry["data_offsets"]
            header[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                            "data_offsets": [position, position + end - begin]}
            moves.append((begin, end - begin))
            position += end - begin
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        self._data.flush()
        with path.open("wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            out.flush()
            for offset, left in moves:
                while left:
                    n = os.copy_file_range(self._data.fileno(), out.fileno(), left, offset_src=offset)
                    if n == 0:
                        raise OSError(f"{path}: short copy")
                    left -= n
                    offset += n
        self._data.close()
        Path(self._data.name).unlink()
        index = len(self.shards)
        self.shards.append(path)
        self.weight_map.update({name: index for name in self._entries})
        self._entries, self._data, self._size = {}, None, 0
        self.shard_json = {k: {} for k in self.shard_json}

    def close(self) -> list[Path]:
        """Finish the last shard, give the shards their final names, write the index; returns the files."""
        if self._entries or not self.shards:
            self._open_data()
            self._close_shard()
        n = len(self.shards)
        if n == 1:
            final = [self.directory / f"{self.prefix}.safetensors"]
        else:
            final = [self.directory / f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, path in zip(self.shards, final):
            tmp.replace(path)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: final[i].name for name, i in sorted(self.weight_map.items())}}
            (self.directory / f"{self.prefix}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2) + "\n",
                                                                         encoding="utf-8")
        self.shards = final
        return final
