"""Reading a .orz pack: unpack, verify, list, and read one tensor without the rest."""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard as zstd

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path
from orstack.zstd_pack.codec import Codec, join_planes, plane_sizes
from orstack.zstd_pack.container import read_index

if TYPE_CHECKING:
    import torch

# safetensors / GGUF float dtype names -> torch dtype attribute names.
TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass
class UnpackSummary:
    path: str | None
    files: int
    bytes: int
    seconds: float


class Pack:
    """An open .orz pack. Use as a context manager."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"{self.path}: no such pack file")
        self._fh: BinaryIO = self.path.open("rb")
        try:
            self.index, self.digest, self.data_end = read_index(self._fh, str(self.path))
            # Frames are read through a memory map: stored planes are then used in place.
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
            self.codec = Codec(int(self.index["config"].get("level", 3)), self._read_dictionary())
        except BaseException:
            self._fh.close()
            raise
        self.threads = threads or os.cpu_count() or 1

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._view.release()
            self._map.close()
        except BufferError:  # a caller or a finishing worker still holds a view into the map: GC closes it
            pass
        self._fh.close()

    def _read_dictionary(self) -> bytes | None:
        loc = self.index.get("dict")
        if not loc:
            return None
        data = bytes(self._view[loc["offset"] : loc["offset"] + loc["length"]])
        if hashlib.sha256(data).hexdigest() != loc["sha256"]:
            raise BadInput(f"{self.path}: corrupted pack (dictionary checksum mismatch)")
        return data

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.index["files"]

    # -- integrity --------------------------------------------------------------------------

    def file_sha256(self) -> str:
        """SHA-256 of every byte of the pack file (the bytes this Pack reads)."""
        return self._sha256(len(self._view))

    def _sha256(self, end: int) -> str:
        h = hashlib.sha256()
        for start in range(0, end, 1 << 24):
            with self._view[start : min(start + (1 << 24), end)] as block:
                h.update(block)
        return h.hexdigest()

    def stored_bytes_intact(self) -> bool | None:
        """Whether the data section (header, frames, dictionary) hashes to the index's
        `data_sha256`; None for a pack written before that checksum existed."""
        expected = self.index.get("data_sha256")
        if expected is None:
            return None
        return self._sha256(self.data_end) == expected

    def check(self, on_progress: Callable[[int], None] | None = None) -> None:
        """Check every byte of the pack without writing anything: the data checksum (about 0.1 s
        per 100 MB); when it fails, or the pack has none, every file is decoded so that the error
        names the damaged tensor and file."""
        intact = self.stored_bytes_intact()
        if intact:
            return
        self._each_file(None, on_progress)
        if intact is False:  # the damage decodes to the same bytes (e.g. a zstd frame's padding)
            self._stored_bytes_damaged()

    def _stored_bytes_damaged(self) -> None:
        raise BadInput(f"{self.path}: corrupted pack: the stored bytes do not match the checksum written "
                       "when it was packed (data_sha256)")

    # -- decoding -------------------------------------------------------------------------

    def _decode_chunk(self, blob: dict[str, Any], chunk: dict[str, Any]) -> memoryview | bytes:
        stored_total = sum(n for _, n in chunk["frames"])
        data = self._view[chunk["offset"] : chunk["offset"] + stored_total]
        if len(data) != stored_total:
            raise ValueError("pack is shorter than its index says")
        sizes = plane_sizes(chunk["size"], blob["transform"])
        if len(sizes) != len(chunk["frames"]):
            raise ValueError("frame count does not match the transform")
        planes, pos = [], 0
        for (method, n), size in zip(chunk["frames"], sizes):
            planes.append(self.codec.decompress_plane(method, data[pos : pos + n], size))
            pos += n
        return join_planes(planes, blob["transform"])

    def _chunks(self, blob_ids: list[int], pool: ThreadPoolExecutor | None, what: str) -> Iterator[memoryview | bytes]:
        """Decoded chunks of the given blobs, in order, decoded `threads` at a time."""
        jobs = ((self.index["blobs"][b], c) for b in blob_ids for c in self.index["blobs"][b]["chunks"])
        pending: deque = deque()
        window = 2 * self.threads + 2
        try:
            for blob, chunk in jobs:
                if pool is None:
                    yield self._decode_chunk(blob, chunk)
                    continue
                pending.append(pool.submit(self._decode_chunk, blob, chunk))
                if len(pending) > window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except (zstd.ZstdError, ValueError) as e:
            raise BadInput(f"{self.path}: corrupted pack: {what} does not decode ({e})") from None
        finally:
            for f in pending:
                f.cancel()

    def _find(self, name: str, file: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        hits = [(f, s) for f in self.files if file is None or f["path"] == file
                for s in f["segments"] if s["name"] == name]
        if not hits:
            raise BadInput(f"{self.path}: no tensor named '{name}'" + (f" in {file}" if file else ""))
        if len(hits) > 1 and len({f["path"] for f, _ in hits}) > 1:
            raise BadInput(f"{self.path}: tensor '{name}' is in several files "
                           f"({', '.join(f['path'] for f, _ in hits)}); name the file")
        return hits[0]

    def read_tensor_bytes(self, name: str, file: str | None = None) -> bytes:
        """The exact bytes of one tensor (or header/gap segment), checked against its SHA-256.
        Only that tensor's frames are read and decoded."""
        _, seg = self._find(name, file)
        data = b"".join(self._chunks([seg["blob"]], None, f"tensor {name}"))
        if hashlib.sha256(data).hexdigest() != self.index["blobs"][seg["blob"]]["sha256"]:
            raise BadInput(f"{self.path}: corrupted pack: tensor {name} fails its SHA-256 check")
        return data

    def read_tensor(self, name: str, file: str | None = None) -> torch.Tensor:
        """One tensor as a torch tensor of its dtype and shape. Quantized GGUF tensors come
        back as their raw block bytes (uint8, 1-D)."""
        import torch

        _, seg = self._find(name, file)
        data = bytearray(self.read_tensor_bytes(name, file))
        dtype = getattr(torch, TORCH_DTYPES.get(seg["dtype"], "uint8"))
        if seg["dtype"] not in TORCH_DTYPES or not data:
            return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(data, dtype=dtype).reshape(seg["shape"])

    # -- whole files ------------------------------------------------------------------------

    def iter_file(self, path: str, verify: bool = True, pool: ThreadPoolExecutor | None = None) -> Iterator[bytes]:
        """The bytes of one packed file, chunk by chunk, decoded `threads` at a time; with
        `verify`, its SHA-256 is checked at the end (BadInput on mismatch)."""
        record = next((f for f in self.files if f["path"] == path), None)
        if record is None:
            raise BadInput(f"{self.path}: no file named '{path}' in the pack")
        own = pool is None
        pool = pool or ThreadPoolExecutor(self.threads)
        segments = record["segments"]
        try:
            h = hashlib.sha256() if verify else None
            # Chunks come in segment order; with `verify`, each segment is checked against its blob's
            # SHA-256 as it completes, so damage is named by the tensor it hits.
            # (Empty segments have no chunks: skipped.)
            stored = [s for s in segments if s["size"]]
            seg_index, seg_left, seg_hash = 0, stored[0]["size"] if stored else 0, hashlib.sha256()
            for chunk in self._chunks([s["blob"] for s in segments], pool, f"file {path}"):
                if h is not None:
                    h.update(chunk)
                    seg_hash.update(chunk)
                    seg_left -= len(chunk)
                    if seg_left <= 0:
                        self._check_segment(path, stored[seg_index], seg_hash)
                        seg_index += 1
                        seg_left = stored[seg_index]["size"] if seg_index < len(stored) else 0
                        seg_hash = hashlib.sha256()
                yield chunk
            if h is not None and h.hexdigest() != record["sha256"]:
                raise BadInput(f"{self.path}: corrupted pack: {path} fails its SHA-256 check")
        finally:
            if own:
                pool.shutdown(cancel_futures=True)

    def _check_segment(self, path: str, segment: dict[str, Any], digest: Any) -> None:  # noqa: ANN401 - hashlib
        if digest.hexdigest() != self.index["blobs"][segment["blob"]]["sha256"]:
            name = segment["name"]
            what = f"tensor {name}" if not name.startswith("__") else f"segment {name}"
            raise BadInput(f"{self.path}: corrupted pack: {what} of {path} fails its SHA-256 check")

    def _stream_file(self, record: dict[str, Any], sink: Callable[[bytes], Any] | None, pool: ThreadPoolExecutor,
                     on_progress: Callable[[int], None]) -> None:
        for chunk in self.iter_file(record["path"], True, pool):
            if sink is not None:
                sink(chunk)
            on_progress(len(chunk))

    def _each_file(self, open_sink: Callable[[dict[str, Any]], Any] | None,
                   on_progress: Callable[[int], None] | None) -> UnpackSummary:
        start = time.perf_counter()
        progress = on_progress or (lambda n: None)
        with ThreadPoolExecutor(self.threads) as pool:
            for record in self.files:
                if open_sink is None:
                    self._stream_file(record, None, pool, progress)
                    continue
                with open_sink(record) as fh:
                    self._stream_file(record, fh.write, pool, progress)
        total = sum(f["size"] for f in self.files)
        return UnpackSummary(None, len(self.files), total, time.perf_counter() - start)

    def verify(self, on_progress: Callable[[int], None] | None = None) -> UnpackSummary:
        """Decode everything, check every tensor's and file's SHA-256 and the data checksum; write nothing."""
        summary = self._each_file(None, on_progress)
        if self.stored_bytes_intact() is False:
            self._stored_bytes_damaged()
        return summary

    def extract(self, out: str | Path, on_progress: Callable[[int], None] | None = None) -> UnpackSummary:
        """Restore the packed file (or directory) at `out`, atomically: on any damage
        nothing is left at `out` (an existing `out` is only replaced by a complete one)."""
        out = Path(out)
        directory = self.index["root"] == "dir"
        if out.exists() and out.is_dir() != directory:
            what = "a directory" if out.is_dir() else "a file"
            holds = "a directory of files" if directory else f"one file ({self.files[0]['path']})"
            raise BadInput(f"{out}: is {what}, but the pack holds {holds}; choose another -o")
        with atomic_path(out, directory=directory) as tmp:
            def open_sink(record: dict[str, Any]) -> BinaryIO:
                target = tmp / record["path"] if directory else tmp
                target.parent.mkdir(parents=True, exist_ok=True)
                return target.open("wb")

            summary = self._each_file(open_sink, on_progress)
            if self.stored_bytes_intact() is False:
                self._stored_bytes_damaged()
        summary.path = str(out)
        return summary

    def list_segments(self) -> list[dict[str, Any]]:
        """One row per segment: where it is, its type, stored size and ratio. A segment whose
        bytes are stored once already (an identical tensor) shows stored 0 and `same_as`."""
        rows, seen = [], {}
        for f in self.files:
            for s in f["segments"]:
                blob = self.index["blobs"][s["blob"]]
                stored = sum(n for c in blob["chunks"] for _, n in c["frames"])
                first = seen.setdefault(s["blob"], f"{f['path']}:{s['name']}")
                dup = first != f"{f['path']}:{s['name']}"
                rows.append({"file": f["path"], "name": s["name"], "dtype": s["dtype"], "shape": s["shape"],
                             "transform": blob["transform"], "size": s["size"], "stored": 0 if dup else stored,
                             "ratio": round(s["size"] / stored, 4) if stored and not dup else None,
                             "same_as": first if dup else None})
        return rows


def unpack(pack_path: str | Path, out: str | Path, threads: int = 0,
           on_progress: Callable[[int], None] | None = None) -> UnpackSummary:
    with Pack(pack_path, threads) as p:
        return p.extract(out, on_progress)


def verify(pack_path: str | Path, threads: int = 0, on_progress: Callable[[int], None] | None = None) -> UnpackSummary:
    with Pack(pack_path, threads) as p:
        return p.verify(on_progress)


def list_contents(pack_path: str | Path) -> list[dict[str, Any]]:
    """One row per segment (Pack.list_segments), after checking every byte of the pack."""
    with Pack(pack_path) as p:
        p.check()
        return p.list_segments()


def read_tensor(pack_path: str | Path, name: str, file: str | None = None) -> torch.Tensor:
    with Pack(pack_path) as p:
        return p.read_tensor(name, file)
