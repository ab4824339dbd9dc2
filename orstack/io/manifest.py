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
    return {k: _jsonable(v) for k, v in dict(config).items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def config_class_name(config: Any) -> str | None:
    """"module:QualName" of a config dataclass, as the manifest records it."""
    if not dataclasses.is_dataclass(config):
        return None
    cls = type(config)
    return f"{cls.__module__}:{cls.__qualname__}"


def config_from_args(cls: type, args: dict[str, Any]) -> Any:
    """Rebuild a config dataclass (nested ones included) from a manifest's `args`: the inverse of
    as_args, so that any output can be reproduced from its manifest alone."""
    import typing

    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in args:
            continue
        value = args[f.name]
        nested = _dataclass_in(hints.get(f.name))
        if nested is not None and isinstance(value, dict):
            value = config_from_args(nested, value)
        elif isinstance(value, list) and _is_tuple_type(hints.get(f.name)):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def config_from_manifest(manifest: dict[str, Any]) -> Any:
    """The config dataclass that made an output, from its manifest's `config_class` and `args`."""
    import importlib

    module, _, name = manifest["config_class"].partition(":")
    return config_from_args(getattr(importlib.import_module(module), name), manifest.get("args", {}))


def _dataclass_in(hint: Any) -> type | None:
    import typing

    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c) and isinstance(c, type)), None)


def _is_tuple_type(hint: Any) -> bool:
    import typing

    return hint is tuple or typing.get_origin(hint) is tuple or any(
        typing.get_origin(a) is tuple or a is tuple for a in typing.get_args(hint))


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
        "config_class": config_class_name(args),
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
