"""The output policy, one for every stage: what may be written where, checked before any work.

Refused up front (BadInput, exit 2), so a run never fails or destroys anything after the work:
- an existing output of the other type (a file where a directory goes, or the reverse);
- a non-empty directory that orstack did not write, where a checkpoint directory goes;
- a missing parent directory, or one that cannot be written;
- two outputs of one command on the same path, or an output on one of its inputs.
An existing output of the right type is replaced only by a complete new one (orstack/io/atomic.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orstack.errors import BadInput

STDOUT = "-"


@dataclass(frozen=True)
class Output:
    """One output of a command: its path (None or '-' for standard output), whether it is a
    file or a directory, and the option that named it (for messages)."""

    path: str | os.PathLike | None
    kind: str = "file"  # "file" or "dir"
    option: str = "-o"
    # What an existing directory may hold to be replaced: "orstack" (an orstack output or
    # nothing), "never" (must not exist) or "any".
    replace: str = "orstack"

    @property
    def to_stdout(self) -> bool:
        return self.path is None or str(self.path) == STDOUT


def is_orstack_output(path: Path) -> bool:
    """A directory orstack wrote (it carries orstack.json), or an empty one."""
    return (path / "orstack.json").is_file() or not any(path.iterdir())


def check_outputs(outputs: Sequence[Output], inputs: Sequence[str | os.PathLike | None] = ()) -> None:
    """Apply the policy to every output of one command; the first violation is raised."""
    seen: dict[Path, Output] = {}
    input_paths = {Path(p).resolve(): str(p) for p in inputs if p is not None and str(p) != STDOUT}
    for out in outputs:
        if out.to_stdout:
            continue
        path = Path(out.path)
        where = f"{out.option} {path}"
        resolved = path.resolve()
        if resolved in seen:
            raise BadInput(f"{where}: the same path as {seen[resolved].option}; give each output its own path")
        seen[resolved] = out
        if resolved in input_paths:
            raise BadInput(f"{where}: would overwrite the input {input_paths[resolved]}")
        _check_existing(path, out, where)
        _check_parent(path, where)


def check_output(path: str | os.PathLike | None, kind: str = "file", option: str = "-o", *,
                 inputs: Sequence[str | os.PathLike | None] = (), replace: str = "orstack") -> None:
    """check_outputs for a command with one output."""
    check_outputs([Output(path, kind, option, replace)], inputs)


def _check_existing(path: Path, out: Output, where: str) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if out.replace == "never":
        raise BadInput(f"{where}: already exists; remove it or choose another path")
    if out.kind == "file" and path.is_dir():
        raise BadInput(f"{where}: is a directory, and this output is a file; refusing to replace it")
    if out.kind == "dir" and not path.is_dir():
        raise BadInput(f"{where}: is a file, and this output is a directory; refusing to replace it")
    if out.kind == "dir" and out.replace == "orstack" and not is_orstack_output(path):
        raise BadInput(f"{where}: directory is not empty and was not written by orstack (no orstack.json); "
                       "refusing to replace it")


def _check_parent(path: Path, where: str) -> None:
    parent = path.absolute().parent
    if not parent.is_dir():
        reason = "is not a directory" if parent.exists() else "does not exist"
        raise BadInput(f"{where}: directory {parent} {reason}")
    # Create and remove a probe: os.access misses read-only mounts seen through some filesystems.
    probe = parent / f".{path.name}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
    except OSError as e:
        raise BadInput(f"{where}: cannot write in {parent} ({e.strerror or type(e).__name__})") from None
    probe.unlink()
