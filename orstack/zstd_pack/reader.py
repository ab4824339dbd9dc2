"""Reading a .orz pack: unpack, verify, list, and read one tensor without the rest."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import zstandard as zstd

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path
from orstack.zstd_pack.codec import Codec, Scratch, join_into, plane_sizes
from orstack.zstd_pack.container import read_index

if TYPE_CHECKING:
    import torch

# safetensors / GGUF float dtype names -> torch dtype attribute names.
TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
                "U64": "uint64"}


def as_tensor(data: np.ndarray, segment: dict[str, Any]) -> torch.Tensor:
    """Decoded bytes (uint8) as a torch tensor of the segment's dtype and shape, sharing their
    memory; a dtype torch does not name (quantized GGUF blocks) stays uint8, 1-D."""
    import torch

    tensor = torch.from_numpy(data)
    if segment["dtype"] not in TORCH_DTYPES or not len(data):
        return tensor
    return tensor.view(getattr(torch, TORCH_DTYPES[segment["dtype"]])).reshape(segment["shape"])


@dataclass
class UnpackSummary:
    path: str | None
    files: int
    bytes: int
    seconds: float


# Decode jobs: runs of consecutive chunks of one blob, about this many bytes each. A job is one
# submit and one result on the thread pool: ~1 MiB amortises that overhead, and a buffer of it
# still stays in the cache while it is hashed or written.
JOB_BYTES = 1 << 20


class Pack:
    """An open .orz pack. Use as a context manager.

    Frames are read with positional reads (os.preadv into per-thread buffers), not through a
    memory map: pages of a map stay counted in the process's resident set until it is
    unmapped, so reading one tensor of a mapped pack, or hashing it, would make the process as
    large as the pack; a read costs exactly the frames and leaves them in the page cache."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"{self.path}: no such pack file")
        self._fh: BinaryIO = self.path.open("rb")
        try:
            self._fd = self._fh.fileno()
            self.size = os.fstat(self._fd).st_size
            self.index, self.digest, self.data_end = read_index(self._fh, str(self.path))
            self.codec = Codec(int(self.index["config"].get("level", 3)), self._read_dictionary())
        except BaseException:
            self._fh.close()
            raise
        self.threads = threads or os.cpu_count() or 1
        self._scratch = Scratch()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._fh.close()

    def pool(self) -> ThreadPoolExecutor | None:
        """The pack's decoding threads (None with one thread), started on first use."""
        if self.threads <= 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads)
            return self._pool

    def _pread(self, offset: int, n: int, into: memoryview | None = None) -> memoryview:
        """n bytes at `offset`, read into `into` (or a new buffer); short at the end of the file."""
        buf = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            k = os.preadv(self._fd, [buf[got:n]], offset + got)
            if k == 0:
                break
            got += k
        return buf[:got]

    def _read_dictionary(self) -> bytes | None:
        loc = self.index.get("dict")
        if not loc:
            return None
        data = bytes(self._pread(loc["offset"], loc["length"]))
        if hashlib.sha256(data).hexdigest() != loc["sha256"]:
            raise BadInput(f"{self.path}: corrupted pack (dictionary checksum mismatch)")
        return data

    @property
    def files(self) -> list[dict[str, Any]]:
        return self.index["files"]

    # -- integrity --------------------------------------------------------------------------

    def file_sha256(self) -> str:
        """SHA-256 of every byte of the pack file (the bytes this Pack reads)."""
        return self._sha256(self.size)

    def _sha256(self, end: int) -> str:
        h = hashlib.sha256()
        block = memoryview(bytearray(1 << 22))
        for start in range(0, end, len(block)):
            h.update(self._pread(start, min(len(block), end - start), block))
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

    def _decode_chunk_into(self, blob: dict[str, Any], chunk: dict[str, Any], out: np.ndarray) -> None:
        """Decode one chunk into `out` (uint8, the chunk's size); ValueError/ZstdError if damaged."""
        stored_total = sum(n for _, n in chunk["frames"])
        data = self._pread(chunk["offset"], stored_total, self._scratch.buffer(stored_total))
        if len(data) != stored_total:
            raise ValueError("pack is shorter than its index says")
        sizes = plane_sizes(chunk["size"], blob["transform"])
        if len(sizes) != len(chunk["frames"]):
            raise ValueError("frame count does not match the transform")
        planes, pos = [], 0
        for (method, n), size in zip(chunk["frames"], sizes):
            planes.append(self.codec.decompress_plane(method, data[pos : pos + n], size))
            pos += n
        join_into(planes, blob["transform"], out, self._scratch)

    def _jobs(self, blob_ids: list[int]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]], int]]:
        """(blob, chunks, bytes): runs of consecutive chunks of one blob of about JOB_BYTES."""
        for b in blob_ids:
            blob = self.index["blobs"][b]
            run: list[dict[str, Any]] = []
            size = 0
            for chunk in blob["chunks"]:
                if run and size + chunk["size"] > JOB_BYTES:
                    yield blob, run, size
                    run, size = [], 0
                run.append(chunk)
                size += chunk["size"]
            if run:
                yield blob, run, size

    def _decode_job(self, blob: dict[str, Any], chunks: list[dict[str, Any]], out: np.ndarray) -> np.ndarray:
        pos = 0
        for chunk in chunks:
            self._decode_chunk_into(blob, chunk, out[pos : pos + chunk["size"]])
            pos += chunk["size"]
        if pos != len(out):
            raise ValueError("chunk sizes do not add up to the blob")
        return out

    def _chunks(self, blob_ids: list[int], pool: ThreadPoolExecutor | None, what: str,
                reuse_buffers: bool = False) -> Iterator[memoryview]:
        """Decoded pieces of the given blobs, in order (each within one blob), decoded `threads`
        at a time. With `reuse_buffers`, a piece is valid only until the next one is asked for:
        its buffer is then decoded into again (no allocation, no page faults per piece)."""
        free: list[np.ndarray] = []
        pending: deque = deque()
        window = 2 * self.threads + 2

        def buffer(size: int) -> np.ndarray:
            if not reuse_buffers:
                return np.empty(size, dtype=np.uint8)
            buf = free.pop() if free else np.empty(JOB_BYTES, dtype=np.uint8)
            return buf if size <= len(buf) else np.empty(size, dtype=np.uint8)

        try:
            for blob, chunks, size in self._jobs(blob_ids):
                out = buffer(size)
                if pool is None:
                    yield memoryview(self._decode_job(blob, chunks, out[:size]))
                    free.append(out)
                    continue
                pending.append((pool.submit(self._decode_job, blob, chunks, out[:size]), out))
                if len(pending) > window:
                    future, buf = pending.popleft()
                    yield memoryview(future.result())
                    free.append(buf)
            while pending:
                future, buf = pending.popleft()
                yield memoryview(future.result())
                free.append(buf)
        except (zstd.ZstdError, ValueError) as e:
            raise BadInput(f"{self.path}: corrupted pack: {what} does not decode ({e})") from None
        finally:
            for future, _ in pending:
                future.cancel()
            # A worker still decoding into a buffer must finish before the buffer can go.
            for future, _ in pending:
                if not future.cancelled():
                    try:
                        future.result()
                    except Exception:  # noqa: BLE001, S110 - already reported (or abandoned)
                        pass

    def _find(self, name: str, file: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        hits = [(f, s) for f in self.files if file is None or f["path"] == file
                for s in f["segments"] if s["name"] == name]
        if not hits:
            raise BadInput(f"{self.path}: no tensor named '{name}'" + (f" in {file}" if file else ""))
        if len(hits) > 1 and len({f["path"] for f, _ in hits}) > 1:
            raise BadInput(f"{self.path}: tensor '{name}' is in several files "
                           f"({', '.join(f['path'] for f, _ in hits)}); name the file")
        return hits[0]

    def _decode_jobs(self, jobs: list[tuple], what: str, pool: Any) -> None:
        """Decode (blob, chunks, destination) jobs, in `pool` when given; BadInput naming `what`
        when a frame does not decode."""
        try:
            if pool is None:
                for job in jobs:
                    self._decode_job(*job)
            else:
                for future in [pool.submit(self._decode_job, *job) for job in jobs]:
                    future.result()
        except (zstd.ZstdError, ValueError) as e:
            raise BadInput(f"{self.path}: corrupted pack: {what} does not decode ({e})") from None

    def decode_blob(self, blob_id: int, what: str) -> np.ndarray:
        """The bytes of one blob in a new uint8 array, its chunks decoded in parallel straight into
        it, checked against the blob's SHA-256 (BadInput naming `what` on any damage)."""
        blob = self.index["blobs"][blob_id]
        out = np.empty(blob["size"], dtype=np.uint8)
        jobs, pos = [], 0
        for b, chunks, size in self._jobs([blob_id]):
            jobs.append((b, chunks, out[pos : pos + size]))
            pos += size
        self._decode_jobs(jobs, what, self.pool() if len(jobs) > 1 else None)
        if hashlib.sha256(out).hexdigest() != blob["sha256"]:
            raise BadInput(f"{self.path}: corrupted pack: {what} fails its SHA-256 check")
        return out

    def read_tensor_bytes(self, name: str, file: str | None = None) -> bytes:
        """The exact bytes of one tensor (or header/gap segment), checked against its SHA-256.
        Only that tensor's frames are read and decoded."""
        _, seg = self._find(name, file)
        return self.decode_blob(seg["blob"], f"tensor {name}").tobytes()

    def read_tensor(self, name: str, file: str | None = None) -> torch.Tensor:
        """One tensor as a torch tensor of its dtype and shape, decoded straight into its own
        memory. Quantized GGUF tensors come back as their raw block bytes (uint8, 1-D)."""
        _, seg = self._find(name, file)
        return as_tensor(self.decode_blob(seg["blob"], f"tensor {name}"), seg)

    def read_file(self, path: str, verify: bool = True) -> np.ndarray:
        """One packed file, whole, in a new uint8 array: every blob decoded in parallel straight
        into its place; with `verify`, each segment's and the file's SHA-256 are checked."""
        record = self._file(path)
        out = np.empty(record["size"], dtype=np.uint8)
        jobs = []
        for seg in record["segments"]:
            pos = seg["offset"]
            for blob, chunks, size in self._jobs([seg["blob"]]):
                jobs.append((blob, chunks, out[pos : pos + size]))
                pos += size
        self._decode_jobs(jobs, f"file {path}", self.pool())
        if not verify:
            return out
        for seg in record["segments"]:
            if seg["size"]:
                self._check_segment(path, seg, hashlib.sha256(out[seg["offset"] : seg["offset"] + seg["size"]]))
        if hashlib.sha256(out).hexdigest() != record["sha256"]:
            raise BadInput(f"{self.path}: corrupted pack: {path} fails its SHA-256 check")
        return out

    # -- whole files ------------------------------------------------------------------------

    def _file(self, path: str) -> dict[str, Any]:
        record = next((f for f in self.files if f["path"] == path), None)
        if record is None:
            raise BadInput(f"{self.path}: no file named '{path}' in the pack")
        return record

    def iter_file(self, path: str, verify: bool = True, pool: ThreadPoolExecutor | None = None,
                  reuse_buffers: bool = False) -> Iterator[memoryview]:
        """The bytes of one packed file, piece by piece, decoded `threads` at a time; with
        `verify`, each segment's and the file's SHA-256 are checked (BadInput on mismatch).
        With `reuse_buffers`, a piece is valid only until the next is asked for (a writer or a
        hash needs no more, and it saves an allocation per piece)."""
        record = self._file(path)
        pool = pool or self.pool()
        segments = record["segments"]
        h = hashlib.sha256() if verify else None
        # Pieces come in segment order; with `verify`, each segment is checked against its blob's
        # SHA-256 as it completes, so damage is named by the tensor it hits.
        # (Empty segments have no chunks: skipped.)
        stored = [s for s in segments if s["size"]]
        seg_index, seg_left, seg_hash = 0, stored[0]["size"] if stored else 0, hashlib.sha256()
        for piece in self._chunks([s["blob"] for s in segments], pool, f"file {path}", reuse_buffers):
            if h is not None:
                h.update(piece)
                seg_hash.update(piece)
                seg_left -= len(piece)
                if seg_left <= 0:
                    self._check_segment(path, stored[seg_index], seg_hash)
                    seg_index += 1
                    seg_left = stored[seg_index]["size"] if seg_index < len(stored) else 0
                    seg_hash = hashlib.sha256()
            yield piece
        if h is not None and h.hexdigest() != record["sha256"]:
            raise BadInput(f"{self.path}: corrupted pack: {path} fails its SHA-256 check")

    def _check_segment(self, path: str, segment: dict[str, Any], digest: Any) -> None:  # noqa: ANN401 - hashlib
        if digest.hexdigest() != self.index["blobs"][segment["blob"]]["sha256"]:
            name = segment["name"]
            what = f"tensor {name}" if not name.startswith("__") else f"segment {name}"
            raise BadInput(f"{self.path}: corrupted pack: {what} of {path} fails its SHA-256 check")

    def _stream_file(self, record: dict[str, Any], sink: Callable[[memoryview], Any] | None,
                     pool: ThreadPoolExecutor | None, on_progress: Callable[[int], None]) -> None:
        for piece in self.iter_file(record["path"], True, pool, reuse_buffers=True):
            if sink is not None:
                sink(piece)
            on_progress(len(piece))

    def _each_file(self, open_sink: Callable[[dict[str, Any]], Any] | None,
                   on_progress: Callable[[int], None] | None, records: list[dict[str, Any]] | None = None,
                   ) -> UnpackSummary:
        start = time.perf_counter()
        progress = on_progress or (lambda n: None)
        records = self.files if records is None else records
        pool = self.pool()
        for record in records:
            if open_sink is None:
                self._stream_file(record, None, pool, progress)
                continue
            with open_sink(record) as fh:
                self._stream_file(record, fh.write, pool, progress)
        total = sum(f["size"] for f in records)
        return UnpackSummary(None, len(records), total, time.perf_counter() - start)

    def verify(self, on_progress: Callable[[int], None] | None = None) -> UnpackSummary:
        """Decode everything, check every tensor's and file's SHA-256 and the data checksum; write nothing."""
        summary = self._each_file(None, on_progress)
        if self.stored_bytes_intact() is False:
            self._stored_bytes_damaged()
        return summary

    def extract(self, out: str | Path, on_progress: Callable[[int], None] | None = None,
                paths: list[str] | None = None) -> UnpackSummary:
        """Restore the packed file (or directory) at `out`, atomically: on any damage
        nothing is left at `out` (an existing `out` is only replaced by a complete one).
        With `paths`, only those files of a directory pack, each checked against its SHA-256
        (the data checksum, which covers the whole pack, is then not read)."""
        out = Path(out)
        records = None if paths is None else [f for f in self.files if f["path"] in set(paths)]
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

            summary = self._each_file(open_sink, on_progress, records)
            if records is None and self.stored_bytes_intact() is False:
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
