"""`orstack zstd-pack`: lossless, seekable packing of a checkpoint (library: orstack/zstd_pack/)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import Output
from orstack.errors import BadInput

HELP = """Pack a checkpoint file or directory losslessly into one seekable .orz file, or unpack it.

Float tensors (from safetensors and GGUF headers) are split into byte planes so their
exponent bytes compress well; everything else is zstd-compressed as is. Identical tensors
are stored once; every file's SHA-256 is stored and checked on unpack. `orstack bench
model.orz` and every stage read .orz checkpoints directly.

Example:

    orstack zstd-pack model_dir -o model.orz && orstack zstd-pack -d model.orz -o restored

    orstack zstd-pack --list model.orz | head -3; orstack zstd-pack --verify model.orz
"""

SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, option: str) -> int:
    """'131072', '128K', '128KiB', '1M' -> bytes (binary multiples)."""
    m = SIZE.match(text)
    if not m:
        raise BadInput(f"{option}: expected a size like 131072, 128K or 1M, got '{text}'")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def zstd_pack(
    input: Annotated[Path, typer.Argument(help="File or directory to pack; with -d/--list/--verify, a .orz pack.",
                                          show_default=False)],
    output: Output = None,
    decompress: Annotated[bool, typer.Option("-d", "--decompress", help="Unpack INPUT (a .orz) to -o.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="Print one JSON line per tensor/segment: size, ratio.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Decode all, check every SHA-256, write nothing.")] = False,
    level: Annotated[int, typer.Option("--level", "-l", help="zstd level (1-22) for all but exponent planes.")] = 3,
    threads: Annotated[int, typer.Option("--threads", "-T", help="Worker threads (0 = one per core).")] = 0,
    dict_size: Annotated[str, typer.Option("--dict-size", help="Largest zstd dictionary to train for small "
                                           "tensors and files (kept only if it saves more than its size).")] = "128K",
    no_dict: Annotated[bool, typer.Option("--no-dict", help="Do not try a dictionary.")] = False,
    chunk_size: Annotated[str, typer.Option("--chunk-size", help="Bytes of a tensor per independently "
                                            "decodable chunk.")] = "256K",
) -> None:
    modes = [name for name, on in (("-d", decompress), ("--list", list_), ("--verify", verify)) if on]
    if len(modes) > 1:
        raise BadInput(f"{' and '.join(modes)} cannot be combined")
    if not 1 <= level <= 22:
        raise BadInput(f"--level: expected 1..22, got {level}")
    if threads < 0:
        raise BadInput(f"--threads: expected >= 0, got {threads}")
    mode = modes[0] if modes else "pack"
    if mode == "pack" and output is None:
        raise BadInput("-o/--output: required when packing (e.g. -o model.orz)")
    if mode == "-d" and output is None:
        raise BadInput("-o/--output: required with -d (where to restore the packed files)")
    if mode == "--list" and output is not None:
        raise BadInput("--list prints to standard output; -o is not used")

    from orstack import zstd_pack as stage

    if mode == "pack":
        config = stage.PackConfig(level=level, threads=threads, dict_size=parse_size(dict_size, "--dict-size"),
                                  use_dict=not no_dict, chunk_size=parse_size(chunk_size, "--chunk-size"))
        _report_pack(stage.run(input, output, config))
    elif mode == "--list":
        _report_list(stage.run_list(input))
    elif mode == "-d":
        _report_read(stage.run_unpack(input, output, threads), f"restored to {output}")
    else:
        _report_read(stage.run_verify(input, threads), "verified")


def _report_read(summary, done: str) -> None:  # noqa: ANN001 - orstack.zstd_pack.UnpackSummary
    rate = summary.bytes / summary.seconds / 1e6 if summary.seconds else 0.0
    console.info(f"{done}: {summary.files} file(s), {summary.bytes:,} bytes, every SHA-256 matches "
                 f"({summary.seconds:.1f} s, {rate:,.0f} MB/s)")


def _report_list(listing) -> None:  # noqa: ANN001 - orstack.zstd_pack.PackListing
    from orstack.io.jsonl import write_jsonl

    write_jsonl(listing.rows, None)
    tbl = console.new_table("file", "kind", "segments", "size", "stored", "ratio",
                            title=f"{listing.path} ({listing.digest[:12]})")
    for f in listing.files:
        mine = [r for r in listing.rows if r["file"] == f["path"]]
        stored = sum(r["stored"] for r in mine)
        ratio = f"{f['size'] / stored:.3f}x" if stored else "-"
        tbl.add_row(f["path"], f["kind"], str(len(mine)), f"{f['size']:,}", f"{stored:,}", ratio)
    console.table(tbl)
    if listing.dict_trial.get("candidates"):
        console.info(_dict_line(listing.dict_trial))


def _dict_line(trial: dict) -> str:
    if not trial.get("dict_size"):
        return f"dictionary: not trained ({trial['candidates']} small segments, {trial['bytes']:,} bytes: too little)"
    verdict = "used" if trial["used"] else "not used"
    return (f"dictionary: {trial['dict_size']:,} bytes trained on {trial['candidates']} small segments "
            f"({trial['bytes']:,} bytes); measured gain {trial['gain_bytes']:+,} bytes after its own size: {verdict}")


def _report_pack(s) -> None:  # noqa: ANN001 - orstack.zstd_pack.PackSummary
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s.kinds.items()))
    tbl = console.new_table("files", "input B", "packed B", "ratio", "dedup B", "time", "MB/s",
                            title=f"packed {s.path}: {kinds}")
    tbl.add_row(str(s.files), f"{s.input_bytes:,}", f"{s.pack_bytes:,}", f"{s.ratio:.3f}x",
                f"{s.duplicate_bytes:,}", f"{s.seconds:.1f} s",
                f"{s.input_bytes / s.seconds / 1e6:,.1f}" if s.seconds else "-")
    console.table(tbl)
    if s.dict_trial.get("candidates"):
        console.info(_dict_line(s.dict_trial))


def register(app: typer.Typer) -> None:
    app.command("zstd-pack", help=HELP)(zstd_pack)
