"""Lazy per-tensor access to a packed checkpoint: only the tensors asked for are decoded.

    with open_pack("model.orz") as tensors:             # reads the index and the safetensors headers
        w = tensors["model.layers.0.mlp.up_proj.weight"]  # decodes that tensor's frames, checks its SHA-256

`PackedTensors` is a read-only mapping (name -> torch tensor) over every tensor of the
safetensors weight files in a pack, and it has the interface of
`orstack.io.safetensors_file.TensorReader` (keys, shape, dtype, get, nbytes, metadata), so
the layer-by-layer stages (prune, awq, gguf, vocab-trim with streaming on) read a `.orz`
checkpoint tensor by tensor instead of unpacking it first (registered as the `orz-pack`
format's reader in orstack/io/formats.py).

Integrity on lazy access: the index is checked against the trailer's SHA-256 when the pack
is opened; each safetensors header and each tensor is checked against its own SHA-256 when
it is decoded, so damage in a tensor is found (and named) when that tensor is read. Bytes
that are never read are not checked: `Pack.check()` or `--verify` checks every byte.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.zstd_pack.reader import TORCH_DTYPES, Pack, as_tensor

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"


class PackedTensors(Mapping):
    """The tensors of a pack's safetensors files (one file, or a sharded index and its shards),
    each decoded when it is asked for. Use as a context manager, or `close()`."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.pack = Pack(path, threads)
        self.path = self.directory = self.pack.path  # `directory`: the name TensorReader's users print
        try:
            self._where: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
            self.metadata: dict[str, str] = {}
            self.file_metadata: list[dict[str, str]] = []
            for record in self._weight_files():
                self._read_header(record)
        except BaseException:
            self.pack.close()
            raise

    def __enter__(self) -> PackedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pack.close()

    def _weight_files(self) -> list[dict[str, Any]]:
        """What TensorReader reads in the unpacked directory: the shards an index names, else the
        top-level *.safetensors files."""
        files = {f["path"]: f for f in self.pack.files}
        index = next((p for p in sorted(files) if "/" not in p and p.endswith(INDEX_SUFFIX)), None)
        if index is not None:
            try:
                shards = sorted(set(json.loads(bytes(self.pack.read_file(index)))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise BadInput(f"{self.path}: {index} is not a safetensors index ({e})") from None
            missing = [s for s in shards if s not in files]
            if missing:
                raise BadInput(f"{self.path}: {index} names shards the pack does not hold: {', '.join(missing)}")
            chosen = [files[s] for s in shards]
        else:
            chosen = [files[p] for p in sorted(files) if "/" not in p and p.endswith(".safetensors")]
        if not chosen:
            raise BadInput(f"{self.path}: no weight files (*.safetensors) in the pack")
        not_parsed = [f["path"] for f in chosen if f.get("kind") != "safetensors"]
        if not_parsed:
            raise BadInput(f"{self.path}: {not_parsed[0]} is not a valid safetensors file")
        return chosen

    def _read_header(self, record: dict[str, Any]) -> None:
        segments = {s["offset"]: s for s in record["segments"]}
        head = segments.get(0)
        if head is None or head["name"] != "__header__":
            raise BadInput(f"{self.path}: {record['path']} has no safetensors header in the pack")
        raw = self.pack.decode_blob(head["blob"], f"the header of {record['path']}")
        try:
            (n,) = struct.unpack_from("<Q", raw, 0)
            header = json.loads(bytes(raw[8 : 8 + n]))
        except (struct.error, ValueError) as e:
            raise BadInput(f"{self.path}: the header of {record['path']} does not parse ({e})") from None
        base = 8 + n
        meta = header.pop("__metadata__", None) or {}
        self.file_metadata.append(meta)
        self.metadata.update(meta)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            segment = segments.get(base + begin) if end > begin else None
            if end > begin and (segment is None or segment["size"] != end - begin or segment["name"] != name):
                raise BadInput(f"{self.path}: tensor {name} of {record['path']} is not where its header says")
            self._where[name] = (info, segment)

    # -- the TensorReader interface ---------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def keys(self) -> list[str]:  # type: ignore[override] - a list, as TensorReader gives
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][0]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        import torch

        return getattr(torch, TORCH_DTYPES[self._where[name][0]["dtype"]])

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        info, segment = self._where[name]
        if segment is None:  # an empty tensor has no bytes, so no segment
            return torch.empty(tuple(info["shape"]), dtype=self.dtype(name))
        data = self.pack.decode_blob(segment["blob"], f"tensor {name}")
        return as_tensor(data, {"dtype": info["dtype"], "shape": info["shape"]})

    def get(self, name: str, default: Any = None) -> Any:  # noqa: ANN401 - Mapping.get
        """The tensor `name`, decoded now and checked against its SHA-256; `default` if absent."""
        return self[name] if name in self._where else default

    def nbytes(self) -> int:
        return sum(info["data_offsets"][1] - info["data_offsets"][0] for info, _ in self._where.values())


def open_pack(path: str | Path, threads: int = 0) -> PackedTensors:
    """The tensors of a packed checkpoint, each decoded (and checked) when it is asked for."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such pack file")
    return PackedTensors(path, threads)


def pack_reader(path: Path) -> PackedTensors:
    """The `orz-pack` format's tensor reader (orstack.io.checkpoint.open_weights)."""
    return PackedTensors(path)


def pack_streams(path: Path) -> bool:
    """Whether a .orz holds a checkpoint directory whose weights read tensor by tensor as they
    are stored: plain safetensors (config.json beside them). A packed checkpoint of a special
    format (sparse, packed 4-bit, an adapter) needs that format's own reading: it is unpacked."""
    from orstack.io.checkpoint import detect_format
    from orstack.zstd_pack.load import cached_config_files

    try:
        with Pack(path) as p:
            names = {f["path"] for f in p.files}
            if p.index["root"] != "dir" or "config.json" not in names:
                return False
            if not any("/" not in n and n.endswith(".safetensors") for n in names):
                return False
        return detect_format(cached_config_files(path)) == "hf"
    except BadInput:
        return False
