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
from typing import Any, TextIO

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path

STDIO = "-"


def display_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == STDIO else str(path)


def open_text(path: str | Path) -> TextIO:
    """Open a text input, `-` meaning standard input; a missing file is bad input."""
    if str(path) == STDIO:
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict")
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file")
    if p.is_dir():
        raise BadInput(f"{p}: is a directory, expected a file")
    return p.open("r", encoding="utf-8")


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
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{name}:{lineno}"
                row = parse_jsonl_line(line, where)
                missing = [field for field in required if row.get(field) is None]
                if missing:
                    raise BadInput(f"{where}: missing required field '{missing[0]}'")
                yield lineno, row
        except UnicodeDecodeError as e:
            raise BadInput(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None


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
