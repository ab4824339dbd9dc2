"""Atomic outputs: write to a temporary sibling, rename into place when complete.

An interrupted run (Ctrl-C, crash, failed quality gate) leaves no half-written file or
checkpoint behind, and an existing output is only replaced by a complete new one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orstack.errors import BadInput, DiskFull, is_disk_full


def _temporary_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`.

    With `directory=True` the temporary path is an (empty, created) directory. On any
    exception, KeyboardInterrupt included, the temporary output is removed and `path`
    is left exactly as it was; a full disk becomes DiskFull naming `path`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final, "tmp")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException as e:
        _remove(tmp)
        if is_disk_full(e):
            raise DiskFull(final) from e
        raise


def _replace(tmp: Path, final: Path) -> None:
    # The last line of defence of the output policy (orstack/io/output.py): never swap a
    # directory for a file or a file for a directory, even when a caller did not check.
    if final.exists() and final.is_dir() != tmp.is_dir():
        found, wanted = ("a directory", "a file") if final.is_dir() else ("a file", "a directory")
        raise BadInput(f"{final}: is {found} and this output is {wanted}; refusing to replace it")
    if final.is_dir() and not final.is_symlink():
        # os.replace cannot swap a non-empty directory: move the old one aside first,
        # so that at every instant either the old or the new output is complete.
        old = _temporary_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
