"""The orstack manifest inside a GGUF file: one string key, `orstack.manifest`, in its metadata.

The manifest (orstack/io/manifest.py: stage, the GgufConfig as args, parent, lineage, metrics)
is JSON stored with GGUFWriter.add_string, so any GGUF orstack writes says where it came from.
GGUF metadata precedes the tensor data, so changing the manifest after the file is written
(the validation figures are known only then) rewrites the file: the header is spliced and the
tensor data copied unchanged (tensor offsets are relative to the start of the data section).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

from orstack.errors import BadInput
from orstack.io.gguf_file import STRING as GGUF_STRING
from orstack.io.gguf_file import read_gguf_values

MANIFEST_KEY = "orstack.manifest"


def read_gguf_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a GGUF file orstack wrote, or None when it has none."""
    text = read_gguf_values(path, {MANIFEST_KEY}).get(MANIFEST_KEY)
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: metadata key {MANIFEST_KEY} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BadInput(f"{path}: metadata key {MANIFEST_KEY} is not a JSON object")
    return manifest


def _string_kv(key: str, value: str) -> bytes:
    k, v = key.encode("utf-8"), value.encode("utf-8")
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", GGUF_STRING) + struct.pack("<Q", len(v)) + v


def _end(field) -> int:  # noqa: ANN001 - gguf.gguf_reader.ReaderField
    return field.offset + sum(int(part.nbytes) for part in field.parts)


def replace_manifest(source: Path, out: Path, manifest_json: str) -> None:
    """Write `source` (a little-endian GGUF that has the manifest key) to `out` with the manifest
    replaced; every other byte of metadata, tensor info and tensor data is kept."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    if reader.byte_order != "I":
        raise ValueError(f"{source}: not a little-endian GGUF file")
    field = reader.fields[MANIFEST_KEY]
    start, end = field.offset, _end(field)
    header_end = max(_end(f) for f in [*reader.fields.values(), *(t.field for t in reader.tensors)])
    data_offset, alignment = int(reader.data_offset), int(reader.alignment)
    del reader  # release its memory map of the file
    with open(source, "rb") as src, open(out, "wb") as dst:
        head = src.read(header_end)
        header = head[:start] + _string_kv(MANIFEST_KEY, manifest_json) + head[end:]
        dst.write(header + b"\0" * (-len(header) % alignment))
        src.seek(data_offset)
        shutil.copyfileobj(src, dst, 1 << 24)
