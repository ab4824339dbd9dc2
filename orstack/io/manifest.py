"""`orstack.json`: the manifest beside every checkpoint orstack writes.

It records the stage, its full arguments (the stage's config dataclass), the parent
checkpoint (path and sha256 of its weights), the whole lineage and the stage's metrics,
so any output can be traced and reproduced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orstack import __version__

MANIFEST = "orstack.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".orz")


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory, or None when it has none."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        from orstack.errors import BadInput

        raise BadInput(f"{p}: not valid JSON ({e.msg})") from None


def weights_digest(path: str | Path) -> str:
    """sha256 over a checkpoint's weight files (sorted by name), or over a single file."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def as_args(config: Any) -> dict[str, Any]:
    """A stage config (dataclass or dict) as JSON-ready arguments."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(config).items()}


def build_manifest(
    stage: str,
    args: Any,
    *,
    parent: str | Path | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest for a new output; the lineage is the parent's lineage plus the parent."""
    lineage: list[dict[str, Any]] = []
    parent_entry = None
    if parent is not None:
        parent_path = Path(parent)
        if parent_path.exists():
            parent_entry = {"path": str(parent), "sha256": weights_digest(parent_path)}
            parent_manifest = read_manifest(parent_path) if parent_path.is_dir() else None
            if parent_manifest:
                lineage = list(parent_manifest.get("lineage", []))
                lineage.append(
                    {
                        "stage": parent_manifest.get("stage"),
                        "path": str(parent),
                        "args": parent_manifest.get("args", {}),
                        "metrics": parent_manifest.get("metrics", {}),
                    }
                )
        else:
            parent_entry = {"path": str(parent), "sha256": None}
    manifest = {
        "orstack_version": __version__,
        "stage": stage,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "args": as_args(args),
        "parent": parent_entry,
        "lineage": lineage,
        "metrics": metrics or {},
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    from orstack.io.jsonl import dumps

    Path(directory, MANIFEST).write_text(dumps(manifest) + "\n", encoding="utf-8")
