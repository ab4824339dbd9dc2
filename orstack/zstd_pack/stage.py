"""The zstd-pack stage: one call per mode of `orstack zstd-pack`.

    run(source, output, config)        pack a file or directory into one .orz
    run_unpack(pack, output, threads)  -d: restore the packed files
    run_verify(pack, threads)          --verify: decode everything, check every checksum
    run_list(pack)                     --list: the segments, after checking every byte

Each checks its inputs and outputs (orstack/io/output.py) before any work and shows
progress on stderr. zstd-pack computes without torch, so it takes no Runtime: its worker
threads are the config's (`--threads/-T`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orstack import console
from orstack.errors import BadInput
from orstack.io.output import check_output
from orstack.zstd_pack.container import is_pack
from orstack.zstd_pack.reader import Pack, UnpackSummary
from orstack.zstd_pack.writer import PackConfig, PackSummary, pack


@dataclass
class PackListing:
    """What `--list` shows: one row per segment, and per-file and dictionary facts for the table."""

    path: str
    digest: str  # the index digest
    files: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    dict_trial: dict[str, Any]


def check_threads(threads: int) -> None:
    if threads < 0:
        raise BadInput(f"--threads: expected >= 0, got {threads}")


@contextmanager
def _progress(description: str, total_bytes: int) -> Iterator[Callable[[int], None]]:
    with console.progress() as bar:
        task = bar.add_task(description, total=max(total_bytes, 1) / 1e6, unit="MB")
        try:
            yield lambda n: bar.advance(task, n / 1e6)
        except BaseException:
            # A failed run leaves only its one-line error on stderr: the display stops without its
            # last frame (erased on a terminal, not printed to a log) and the blank line after it.
            bar.live.transient = True
            bar.live.stop()
            bar.disable = True
            raise


def run(source: str | Path, output: str | Path, config: PackConfig) -> PackSummary:
    """Pack `source` (a file or a directory) into `output`, atomically."""
    source, output = Path(source), Path(output)
    if not source.exists():
        raise BadInput(f"{source}: no such file or directory")
    config.validate()
    check_output(output, "file", inputs=[source])
    if output.suffix != ".orz":
        console.warn(f"{output}: packs are recognised as checkpoints by the .orz suffix")
    total = sum(f.stat().st_size for f in ([source] if source.is_file() else source.rglob("*")) if f.is_file())
    with _progress(f"packing {source.name}", total) as advance:
        return pack(source, output, config, on_progress=advance)


def _open_checked(path: str | Path, threads: int = 0) -> Pack:
    """An open pack; a missing file or one that is not a pack is BadInput."""
    path = Path(path)
    check_threads(threads)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if not path.is_file() or not is_pack(path):
        raise BadInput(f"{path}: not an orstack pack (.orz)")
    return Pack(path, threads)


def run_unpack(pack_path: str | Path, output: str | Path, threads: int = 0) -> UnpackSummary:
    """Restore the packed file or directory at `output`; nothing is left there on any damage."""
    output = Path(output)
    with _open_checked(pack_path, threads) as p:
        check_output(output, "dir" if p.index["root"] == "dir" else "file", inputs=[pack_path])
        with _progress("unpacking", sum(f["size"] for f in p.files)) as advance:
            return p.extract(output, advance)


def run_verify(pack_path: str | Path, threads: int = 0) -> UnpackSummary:
    """Decode everything and check every checksum; write nothing."""
    with _open_checked(pack_path, threads) as p, _progress("verifying", sum(f["size"] for f in p.files)) as advance:
        return p.verify(advance)


def run_list(pack_path: str | Path) -> PackListing:
    """The pack's segments, after checking every byte of it (a damaged pack lists nothing)."""
    with _open_checked(pack_path) as p:
        p.check()
        return PackListing(path=str(p.path), digest=p.digest, files=p.files, rows=p.list_segments(),
                           dict_trial=p.index.get("dict_trial") or {})
