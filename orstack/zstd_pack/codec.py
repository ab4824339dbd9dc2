"""Byte grouping and zstd frames: how one chunk of a segment becomes stored bytes.

Float weights are nearly incompressible as a byte stream, but their exponent bytes are
not: in a trained network the exponents of a tensor cluster in a few values (about 2.7
bits of entropy per byte on all-MiniLM-L6-v2), while mantissa bytes are close to random.
ZipNN's observation is that splitting each float into byte planes and compressing each
plane alone lets the entropy coder see that. Two details matter here:

- For fp32 and bf16 the top byte holds the sign and 7 exponent bits, the next byte the
  last exponent bit and mantissa. Swapping the sign bit with that last exponent bit
  makes the top plane exactly the 8-bit exponent (ZipNN rotates the word for the same
  end); the swap is done on the two byte planes, so it costs two cheap uint8 passes.
- zstd's fast levels code such a plane badly (short matches cost more than the literals
  they replace: level 3 gets 2.4x on the exponent plane, below its 3.0x order-0 bound);
  its optimal parser prices matches against entropy-coded literals and gets 3.07x. So
  planes whose byte entropy is low use the optimal parser on small match tables
  (`EXPONENT_PARAMS`, ~13 MB/s), everything else the user's level. Levels 1-2 trade
  that for speed (exponent planes at zstd level 1: 2.75x).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard as zstd

# Transform per float dtype: (bytes per value, swap the sign bit with the lowest exponent
# bit so that the top byte is exactly the exponent). fp16 (5-bit exponent) and fp64
# (11-bit) have no byte-aligned exponent to free.
FLOAT_TRANSFORMS = {"F32": (4, True), "BF16": (2, True), "F16": (2, False), "F64": (8, False)}
WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # little-endian words of k bytes

# Frame storage methods written in the index.
STORED, ZSTD, ZSTD_DICT = 0, 1, 2

# A plane whose order-0 byte entropy is below this (bits) is exponent-like.
LOW_ENTROPY_BITS = 7.0
# zstd's optimal parser (btopt) with small tables: entropy-codes exponent bytes at 3.07x
# (order-0 bound 3.0x; level 3: 2.4x) at ~13 MB/s; zstd levels >= 16 use btopt themselves.
# At --level 1 and 2 exponent planes take the fast path instead (level 1: 2.75x, ~10x faster).
FAST_EXPONENT_LEVEL = 2
EXPONENT_PARAMS = dict(strategy=zstd.STRATEGY_BTOPT, window_log=17, chain_log=6, hash_log=6, search_log=1,
                       min_match=5, target_length=16)


def transform_for(dtype: str, size: int) -> str:
    """'raw', or 'planesK' / 'swap-planesK' for a float tensor of a whole number of values."""
    if dtype not in FLOAT_TRANSFORMS:
        return "raw"
    k, swap = FLOAT_TRANSFORMS[dtype]
    if size % k:
        return "raw"
    return f"swap-planes{k}" if swap else f"planes{k}"


def parse_transform(transform: str) -> tuple[int, bool]:
    """(planes, swapped) of a transform name ('raw' is one plane)."""
    if transform == "raw":
        return 1, False
    swapped = transform.startswith("swap-")
    k = int(transform.removeprefix("swap-").removeprefix("planes"))
    if k not in WORDS:
        raise ValueError(f"unknown transform {transform}")
    return k, swapped


def split_planes(chunk: bytes | memoryview, transform: str) -> list[bytes]:
    """The byte planes of a chunk: plane i holds byte i of every value (little-endian)."""
    k, swapped = parse_transform(transform)
    if k == 1:
        return [bytes(chunk)]
    grid = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, k)
    planes = [np.ascontiguousarray(grid[:, i]) for i in range(k)]
    if swapped:
        top, below = planes[-1], planes[-2]
        # top = sign e7..e1, below = e0 + mantissa  ->  top = e7..e0, below = sign + mantissa
        planes[-1] = (top << 1) | (below >> 7)
        planes[-2] = (below & 0x7F) | (top & 0x80)
    return [p.tobytes() for p in planes]


class Scratch(threading.local):
    """Work arrays of one decoding thread, reused from chunk to chunk.

    Decoding is a handful of passes over memory per chunk, and a fresh array per pass costs
    more than the pass: a 128 KiB plane is at glibc's mmap threshold, so every temporary of
    that size is a new mapping whose pages fault in (bf16 planes joined at ~0.8 GB per
    CPU-second with temporaries, ~3.7 GB with these arrays)."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, n: int, dtype: type) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.dtype != dtype or len(a) < n:
            a = self._arrays[name] = np.empty(max(n, len(a) if a is not None else 0), dtype=dtype)
        return a[:n]

    def buffer(self, n: int) -> memoryview:
        """A writable byte buffer of n bytes (stored frames are read into it)."""
        return memoryview(self.array("read", n, np.uint8))


def _top_word(exponent: np.ndarray, below: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """The top 16 bits of a swapped bf16/fp32 value back from its exponent byte (e7..e0) and the
    byte below it (sign m6..m0): out = sign e7..e0 m6..m0. Six passes over uint16: `below`
    times 0x0101 repeats the byte, which puts the sign at bit 15 beside the mantissa bits."""
    np.copyto(tmp, below, casting="unsafe")
    tmp *= np.uint16(0x0101)
    tmp &= np.uint16(0x807F)
    np.copyto(out, exponent, casting="unsafe")
    out <<= 7
    out |= tmp


def _widen_or(planes: list[np.ndarray], words: np.ndarray, tmp: np.ndarray) -> None:
    """words = planes[0] | planes[1] << 8 | ...: widening copies, shifts and ors (contiguous SIMD
    loops, ~2.5x faster in numpy than writing each plane into a strided column)."""
    np.copyto(words, planes[0], casting="unsafe")
    for i in range(1, len(planes)):
        np.copyto(tmp, planes[i], casting="unsafe")
        tmp <<= 8 * i
        words |= tmp


def join_into(planes: list[bytes | memoryview], transform: str, out: np.ndarray, scratch: Scratch) -> None:
    """Inverse of split_planes, written into `out` (uint8, the chunk's size) without allocating."""
    k, swapped = parse_transform(transform)
    if k == 1:
        out[:] = np.frombuffer(planes[0], dtype=np.uint8)
        return
    n = len(out) // k
    bytes_ = [np.frombuffer(p, dtype=np.uint8) for p in planes]
    if any(len(b) != n for b in bytes_):
        raise ValueError("plane sizes do not match the chunk")
    words = out.view(WORDS[k])
    if swapped and k == 2:  # bf16
        _top_word(bytes_[1], bytes_[0], words, scratch.array("u16", n, np.uint16))
    elif swapped and k == 4:  # fp32: two 16-bit halves, then one widening pass
        high, low, tmp16 = (scratch.array(name, n, np.uint16) for name in ("high", "low", "u16"))
        _top_word(bytes_[3], bytes_[2], high, tmp16)
        _widen_or(bytes_[:2], low, tmp16)
        tmp32 = scratch.array("u32", n, np.uint32)
        np.copyto(words, low, casting="unsafe")
        np.copyto(tmp32, high, casting="unsafe")
        tmp32 <<= 16
        words |= tmp32
    else:
        if swapped:  # a wider float with the swap (not written today): undo it on the byte planes
            exponent, below = bytes_[-1], bytes_[-2]
            top, low8, tmp8 = (scratch.array(name, n, np.uint8) for name in ("top", "low8", "tmp8"))
            np.bitwise_and(below, 0x80, out=top)
            np.right_shift(exponent, 1, out=tmp8)
            top |= tmp8
            np.bitwise_and(below, 0x7F, out=low8)
            np.left_shift(exponent, 7, out=tmp8)
            low8 |= tmp8
            bytes_[-1], bytes_[-2] = top, low8
        _widen_or(bytes_, words, scratch.array(f"w{k}", n, WORDS[k]))


def join_planes(planes: list[bytes], transform: str) -> memoryview | bytes:
    """Inverse of split_planes, into a new buffer."""
    k, _ = parse_transform(transform)
    if k == 1:
        return planes[0]
    out = np.empty(sum(len(p) for p in planes), dtype=np.uint8)
    join_into(planes, transform, out, Scratch())
    return memoryview(out)


def byte_entropy(data: bytes) -> float:
    """Order-0 entropy in bits per byte."""
    if not data:
        return 8.0
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log2(p)).sum())


class Codec:
    """zstd compressors/decompressors per thread (zstandard objects are not thread-safe)."""

    def __init__(self, level: int, dictionary: bytes | None = None) -> None:
        self.level = level
        self.dictionary = zstd.ZstdCompressionDict(dictionary) if dictionary else None
        self._local = threading.local()

    def _get(self, name: str, make):  # noqa: ANN001, ANN202 - small per-thread cache
        obj = getattr(self._local, name, None)
        if obj is None:
            obj = make()
            setattr(self._local, name, obj)
        return obj

    def _compressor(self, kind: str) -> zstd.ZstdCompressor:
        def make() -> zstd.ZstdCompressor:
            common = dict(write_checksum=True, write_content_size=True)
            if kind == "dict":
                return zstd.ZstdCompressor(level=self.level, dict_data=self.dictionary, **common)
            if kind == "exponent" and self.level <= FAST_EXPONENT_LEVEL:
                # zstd level 1 on an exponent plane: mostly Huffman-coded literals, 2.75x, fast.
                return zstd.ZstdCompressor(level=1, **common)
            if kind == "exponent" and self.level < 16:
                params = zstd.ZstdCompressionParameters(**EXPONENT_PARAMS, write_checksum=1, write_content_size=1)
                return zstd.ZstdCompressor(compression_params=params)
            return zstd.ZstdCompressor(level=self.level, **common)

        return self._get(f"c_{kind}", make)

    def compress_plane(self, plane: bytes, use_dict: bool = False) -> tuple[int, bytes]:
        """(method, stored bytes): zstd when it saves space, else the plane as is."""
        if use_dict and self.dictionary is not None:
            kind = "dict"
        else:
            kind = "exponent" if len(plane) >= 4096 and byte_entropy(plane) < LOW_ENTROPY_BITS else "plain"
        out = self._compressor(kind).compress(plane)
        if len(out) >= len(plane):
            return STORED, plane
        return (ZSTD_DICT if kind == "dict" else ZSTD), out

    def decompress_plane(self, method: int, stored: bytes, size: int) -> bytes:
        if method == STORED:
            raw = stored
        elif method == ZSTD:
            raw = self._get("d", zstd.ZstdDecompressor).decompress(stored, max_output_size=size)
        elif method == ZSTD_DICT and self.dictionary is not None:
            d = self._get("dd", lambda: zstd.ZstdDecompressor(dict_data=self.dictionary))
            raw = d.decompress(stored, max_output_size=size)
        else:
            raise ValueError(f"unknown frame method {method}")
        if len(raw) != size:
            raise ValueError(f"frame decodes to {len(raw)} bytes, expected {size}")
        return raw


def plane_sizes(size: int, transform: str) -> list[int]:
    k, _ = parse_transform(transform)
    return [size // k] * k
