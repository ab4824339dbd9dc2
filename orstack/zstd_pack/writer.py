"""pack(): files in, one .orz out (layout in container.py)."""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard as zstd

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path
from orstack.io.manifest import as_args, config_class_name
from orstack.zstd_pack.codec import Codec, split_planes, transform_for
from orstack.zstd_pack.container import write_header, write_index
from orstack.zstd_pack.layout import file_layout


@dataclass
class PackConfig:
    """How to pack. Stored in the pack's index, so a pack says how it was made."""

    level: int = 3  # zstd level for everything but exponent-like planes (1..22)
    threads: int = 0  # worker threads; 0 = one per core
    chunk_size: int = 256 * 1024  # bytes of a tensor per chunk (cache-sized: decoding is memory-bound)
    dict_size: int = 128 * 1024  # largest dictionary to train on small blobs
    use_dict: bool = True  # try a dictionary; kept only when it saves more than its own size
    small_blob: int = 64 * 1024  # blobs (segments) under this many bytes are dictionary candidates

    def validate(self) -> None:
        if not 1 <= self.level <= 22:
            raise BadInput(f"--level: expected 1..22, got {self.level}")
        if self.threads < 0:
            raise BadInput(f"--threads: expected >= 0, got {self.threads}")
        if self.chunk_size < 4096 or self.chunk_size % 64:
            raise BadInput(f"chunk size: expected a multiple of 64 of at least 4096, got {self.chunk_size}")
        if self.use_dict and not 1024 <= self.dict_size <= 1 << 30:
            raise BadInput(f"--dict-size: expected 1 KiB..1 GiB, got {self.dict_size}")

    def workers(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass
class PackSummary:
    path: str
    files: int
    input_bytes: int
    pack_bytes: int
    duplicate_bytes: int  # bytes of segments stored once already (identical tensors)
    dict_trial: dict[str, Any]  # candidates, bytes, dict_size, gain_bytes, used
    seconds: float
    digest: str
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.pack_bytes if self.pack_bytes else 0.0


def collect_inputs(paths: list[Path], exclude: Path | None = None) -> tuple[str, list[tuple[str, Path]]]:
    """('file' | 'dir', [(name in the pack, path)]). One file packs as a file; a directory's
    files (recursively, sorted) keep their relative paths; several inputs keep their names."""
    for p in paths:
        if not p.exists():
            raise BadInput(f"{p}: no such file or directory")
    if len(paths) == 1 and paths[0].is_file():
        return "file", [(paths[0].name, paths[0])]
    entries: list[tuple[str, Path]] = []
    for p in paths:
        if p.is_file():
            entries.append((p.name, p))
            continue
        prefix = "" if len(paths) == 1 else p.name + "/"
        for f in sorted(p.rglob("*")):
            if f.is_file() and (exclude is None or f.resolve() != exclude):
                entries.append((prefix + f.relative_to(p).as_posix(), f))
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise BadInput("inputs: two files would have the same name in the pack")
    if not entries:
        raise BadInput(f"{paths[0]}: no files to pack")
    return "dir", entries


@contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        unwinding = True
        try:
            yield view
            unwinding = False
        finally:
            try:
                view.release()
                mm.close()
            except BufferError:
                # Ctrl-C, SIGTERM or a full disk can strike while a slice of the map is alive in an
                # unwinding frame, which keeps the map open until the frame goes (the garbage collector
                # closes it then). Raising here would replace the real error with "exported pointers exist".
                if not unwinding:
                    raise


class _HashedFile:
    """The pack being written, hashing every byte that goes before the index (data_sha256)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.fh.tell()


def _encode_chunk(codec: Codec, chunk: bytes, transform: str, use_dict: bool = False) -> list[tuple[int, bytes]]:
    return [codec.compress_plane(plane, use_dict) for plane in split_planes(chunk, transform)]


class _FrameWriter:
    """Encodes chunks on a thread pool and appends them to the pack in submission order."""

    def __init__(self, fh: _HashedFile, pool: ThreadPoolExecutor, codec: Codec, window: int) -> None:
        self.fh, self.pool, self.codec, self.window = fh, pool, codec, window
        self.pending: deque[tuple[Future, dict[str, Any], int, Callable[[int], None]]] = deque()

    def submit(self, blob: dict[str, Any], chunk: bytes, on_done: Callable[[int], None]) -> None:
        future = self.pool.submit(_encode_chunk, self.codec, chunk, blob["transform"])
        self.pending.append((future, blob, len(chunk), on_done))
        while len(self.pending) > self.window:
            self._write_one()

    def write_frames(self, blob: dict[str, Any], size: int, frames: list[tuple[int, bytes]]) -> None:
        offset = self.fh.tell()
        for _, stored in frames:
            self.fh.write(stored)
        blob["chunks"].append({"offset": offset, "size": size, "frames": [[m, len(s)] for m, s in frames]})

    def _write_one(self) -> None:
        future, blob, size, on_done = self.pending.popleft()
        self.write_frames(blob, size, future.result())
        on_done(size)

    def drain(self) -> None:
        while self.pending:
            self._write_one()


def pack(paths: Path | str | list[Path | str], out: Path | str, config: PackConfig | None = None,
         on_progress: Callable[[int], None] | None = None) -> PackSummary:
    """Pack a file, a directory or several paths into `out` (atomically).

    `on_progress(n)` is called with the number of input bytes each time a chunk is done.
    Whatever stops the run, nothing is left beside `out`.
    """
    config = config or PackConfig()
    config.validate()
    inputs = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    out = Path(out)
    root, entries = collect_inputs(inputs, exclude=out.resolve())
    progress = on_progress or (lambda n: None)
    start = time.perf_counter()
    files: list[dict[str, Any]] = []
    blobs: list[dict[str, Any]] = []
    blob_ids: dict[str, int] = {}
    small: list[tuple[dict[str, Any], bytes]] = []
    codec = Codec(config.level)
    # A full disk, Ctrl-C or SIGTERM unwind through atomic_path: the temporary sibling is removed
    # (a full disk becomes DiskFull naming `out`), and an existing `out` is left as it was.
    with atomic_path(out) as tmp, tmp.open("wb") as raw, ThreadPoolExecutor(config.workers()) as pool:
        fh = _HashedFile(raw)
        write_header(fh)
        writer = _FrameWriter(fh, pool, codec, window=2 * config.workers() + 2)
        for name, path in entries:
            files.append(_pack_file(name, path, writer, blobs, blob_ids, small, config, progress))
        dict_trial = _write_small_blobs(writer, pool, small, config)
        index = {"format": "orstack-pack", "version": 1, "root": root, "config": as_args(config),
                 "config_class": config_class_name(config), "data_sha256": fh.sha.hexdigest(),
                 "dict": dict_trial.pop("location", None), "dict_trial": dict_trial, "files": files, "blobs": blobs}
        digest = write_index(raw, index)
        raw.flush()
        pack_bytes = raw.tell()
    duplicate = sum(s["size"] for f in files for s in f["segments"]) - sum(b["size"] for b in blobs)
    kinds: dict[str, int] = {}
    for f in files:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    return PackSummary(str(out), len(files), sum(f["size"] for f in files), pack_bytes, duplicate, dict_trial,
                       time.perf_counter() - start, digest, kinds)


def _pack_file(name: str, path: Path, writer: _FrameWriter, blobs: list[dict[str, Any]], blob_ids: dict[str, int],
               small: list[tuple[dict[str, Any], bytes]], config: PackConfig,
               progress: Callable[[int], None]) -> dict[str, Any]:
    """Split one file into segments, queue the segments not stored yet, and return its record."""
    with _mapped(path) as data:
        # Worker threads only ever see copies, and every slice of the map is released on the way
        # out (`with`): a view still held would keep the map from closing.
        file_hash = hashlib.sha256()
        kind, segments = file_layout(data)
        record = {"path": name, "size": len(data), "kind": kind, "segments": []}
        for seg in segments:
            with data[seg.offset : seg.offset + seg.size] as buf:
                file_hash.update(buf)  # segments tile the file in order
                digest = hashlib.sha256(buf).hexdigest()
                if digest in blob_ids:
                    progress(seg.size)
                else:
                    blob_ids[digest] = len(blobs)
                    blob = {"sha256": digest, "size": seg.size, "transform": transform_for(seg.dtype, seg.size),
                            "chunks": []}
                    blobs.append(blob)
                    if config.use_dict and seg.size < config.small_blob:
                        small.append((blob, bytes(buf)))
                        progress(seg.size)
                    else:
                        for a in range(0, seg.size, config.chunk_size):
                            writer.submit(blob, bytes(buf[a : a + config.chunk_size]), progress)
            record["segments"].append({"name": seg.name, "offset": seg.offset, "size": seg.size,
                                       "dtype": seg.dtype, "shape": seg.shape, "blob": blob_ids[digest]})
        writer.drain()
        record["sha256"] = file_hash.hexdigest()
    return record


def _write_small_blobs(writer: _FrameWriter, pool: ThreadPoolExecutor, small: list[tuple[dict[str, Any], bytes]],
                       config: PackConfig) -> dict[str, Any]:
    """Write the small blobs, with a trained dictionary where it measurably pays off.

    Each small blob is encoded with and without the dictionary, each frame keeps the
    smaller; the dictionary is kept only if the frames it shrinks save more than its own
    size. The trial (measured gain, possibly negative) is recorded either way.
    """
    plain = list(pool.map(lambda item: _encode_chunk(writer.codec, item[1], item[0]["transform"]), small))
    plain_bytes = sum(len(s) for frames in plain for _, s in frames)
    trial: dict[str, Any] = {"candidates": len(small), "bytes": sum(len(b) for _, b in small),
                             "stored_without_dict": plain_bytes, "dict_size": 0, "gain_bytes": 0, "used": False}
    chosen = plain
    dictionary = _train_dictionary(small, config) if config.use_dict and small else None
    if dictionary is not None:
        dict_codec = Codec(config.level, dictionary)
        with_dict = pool.map(lambda item: _encode_chunk(dict_codec, item[1], item[0]["transform"], True), small)
        best = [[d if len(d[1]) < len(p[1]) else p for p, d in zip(pf, df)] for pf, df in zip(plain, with_dict)]
        gain = plain_bytes - sum(len(s) for frames in best for _, s in frames) - len(dictionary)
        trial.update(dict_size=len(dictionary), gain_bytes=gain)
        if gain > 0:
            chosen, trial["used"] = best, True
            offset = writer.fh.tell()
            writer.fh.write(dictionary)
            trial["location"] = {"offset": offset, "length": len(dictionary),
                                 "sha256": hashlib.sha256(dictionary).hexdigest()}
    for (blob, raw), frames in zip(small, chosen):
        writer.write_frames(blob, len(raw), frames)
    return trial


def _train_dictionary(small: list[tuple[dict[str, Any], bytes]], config: PackConfig) -> bytes | None:
    """A zstd dictionary trained on the planes of the small blobs, or None when there is too
    little material (zstd's trainer wants many samples, and a dictionary larger than about a
    tenth of its samples cannot pay for itself)."""
    samples = [plane for blob, raw in small for plane in split_planes(raw, blob["transform"]) if plane]
    total = sum(len(s) for s in samples)
    size = min(config.dict_size, total // 10)
    if len(samples) < 8 or size < 256:
        return None
    try:
        return zstd.train_dictionary(size, samples, level=config.level, threads=config.workers()).as_bytes()
    except zstd.ZstdError:
        return None

