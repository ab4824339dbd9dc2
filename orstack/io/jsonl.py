"""Streamed JSONL reading and writing (one object per line, UTF-8).

Rows are plain dicts, so fields a stage does not know are passed through untouched.
Errors name the file and line: `tasks.jsonl:17: not valid JSON (...)`.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path

STDIO = "-"


def display_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == STDIO else str(path)


def check_input_file(path: str | Path, option: str | None = None, *, allow_empty: bool = False) -> str | Path:
    """Check an input file before any work: `-` (standard input) passes; a missing path, a
    directory or (unless `allow_empty`) an empty file is bad input naming the option and path."""
    if str(path) == STDIO:
        return STDIO
    p = Path(path)
    where = f"{option} {p}" if option else str(p)
    if p.is_dir():
        raise BadInput(f"{where}: is a directory, expected a file")
    if not p.exists():
        raise BadInput(f"{where}: no such file")
    if not p.is_file():
        raise BadInput(f"{where}: not a regular file")
    if not allow_empty and p.stat().st_size == 0:
        raise BadInput(f"{where}: the file is empty")
    return p


def open_text(path: str | Path) -> TextIO:
    """Open a text input, `-` meaning standard input; a missing file is bad input.
    Prefer `text_lines`, whose decoding errors name the line."""
    if str(path) == STDIO:
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict")
    p = Path(check_input_file(path, allow_empty=True))
    return p.open("r", encoding="utf-8")


def _binary(path: str | Path) -> BinaryIO:
    if str(path) == STDIO:
        return sys.stdin.buffer
    return Path(check_input_file(path, allow_empty=True)).open("rb")


def not_utf8(name: str, lineno: int, e: UnicodeDecodeError) -> BadInput:
    return BadInput(f"{name}:{lineno}: not UTF-8 text ({e.reason} at column {e.start + 1})")


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a UTF-8 text input (`-` is standard input);
    invalid UTF-8 is bad input naming the file and line."""
    name = display_name(path)
    f = _binary(path)
    try:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(name, lineno, e) from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text input (`-` is standard input); invalid UTF-8 names the line."""
    f = _binary(path)
    try:
        data = f.read()
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise BadInput(f"{display_name(path)}:{lineno}: not UTF-8 text ({e.reason} at column "
                       f"{e.start - line_start + 1})") from None


def parse_jsonl_line(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise BadInput(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl_numbered(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) for each non-blank line; check `required` fields."""
    name = display_name(path)
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        row = parse_jsonl_line(line, where)
        missing = [field for field in required if row.get(field) is None]
        if missing:
            raise BadInput(f"{where}: missing required field '{missing[0]}'")
        yield lineno, row


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    for _, row in read_jsonl_numbered(path, required):
        yield row


def read_jsonl_list(path: str | Path, required: Sequence[str] = (), *, allow_empty: bool = False) -> list[dict]:
    rows = list(read_jsonl(path, required))
    if not rows and not allow_empty:
        raise BadInput(f"{display_name(path)}: no rows")
    return rows


def dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    # numpy and torch scalars/arrays show up in metrics; store them as plain numbers.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path | None = None) -> int:
    """Write rows to `path` atomically, or stream them to stdout when path is None or `-`.

    Returns the number of rows written.
    """
    if path is None or str(path) == STDIO:
        n = 0
        for row in rows:
            sys.stdout.write(dumps(row) + "\n")
            n += 1
        sys.stdout.flush()
        return n
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        n = 0
        for row in rows:
            f.write(dumps(row) + "\n")
            n += 1
    return n


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")
