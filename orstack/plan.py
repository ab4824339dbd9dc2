"""`--dry-run` plans: what a compression stage would do to every tensor, from the checkpoint's
config and safetensors headers alone (no tensor data is read), so that a misfit (a group size
or N:M pattern that does not divide a width, a K-quant that falls back) is found in seconds,
before any compute.

Each stage builds its `Plan` in its own package (orstack/<stage>/plan.py) from the helpers here:
`checkpoint_headers` (names, dtypes, shapes and bytes of the stored tensors) and
`meta_tensors` (every parameter of the model the config describes, on the meta device).
`Plan.emit()` writes one JSONL row per tensor to standard output and a table and a summary to
standard error, then raises BadInput (exit 2) when the plan cannot be carried out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orstack.errors import BadInput

TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class TensorPlan:
    """One tensor of the output: what happens to it and what it will cost."""

    name: str
    shape: tuple[int, ...]
    action: str  # e.g. "prune 2:4", "int4 g128", "Q5_K", "keep"
    bits_per_weight: float  # real bits per weight as stored (scales, masks, zero points included)
    bytes_out: int
    detail: str = ""  # why (a fallback, an override)
    ok: bool = True  # False: the stage would refuse this tensor (the plan's error names it)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["bits_per_weight"] = round(self.bits_per_weight, 4)
        return d


@dataclass
class Plan:
    stage: str
    source: str
    tensors: list[TensorPlan] = field(default_factory=list)
    bytes_in: int = 0  # the stored weights read by the real run
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # why the stage would refuse (exit 2)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)

    def summary(self) -> dict[str, Any]:
        weights = sum(math.prod(t.shape) for t in self.tensors)
        bits = sum(t.bits_per_weight * math.prod(t.shape) for t in self.tensors)
        return {"stage": self.stage, "source": self.source, "tensors": len(self.tensors),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "bits_per_weight": round(bits / weights, 4) if weights else None,
                "actions": dict(Counter(t.action for t in self.tensors)), "notes": self.notes,
                "ok": self.error is None, "error": self.error}

    def emit(self) -> None:
        """JSONL rows (one per tensor, then the summary) on stdout, a table on stderr; BadInput
        when the stage would refuse."""
        import sys

        from orstack import console
        from orstack.io.jsonl import dumps

        rows = [dumps({"tensor": t.row()}) for t in self.tensors] + [dumps({"plan": self.summary()})]
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()
        tbl = console.new_table("tensor", "shape", "action", "bits/w", "MB out", "note",
                                title=f"{self.stage} --dry-run: {self.source}")
        for t in self.tensors:
            tbl.add_row(t.name, "x".join(map(str, t.shape)), t.action if t.ok else f"REFUSED {t.action}",
                        f"{t.bits_per_weight:.2f}", f"{t.bytes_out / 1e6:.2f}", t.detail)
        console.table(tbl)
        s = self.summary()
        for note in self.notes:
            console.info(note)
        console.info(f"plan: {s['tensors']} tensors, {s['bytes_in'] / 1e6:.1f} MB read -> about "
                     f"{s['bytes_out'] / 1e6:.1f} MB written ({s['bits_per_weight']} bits per weight); "
                     "nothing written (--dry-run)")
        if self.error is not None:
            raise BadInput(self.error)


@dataclass
class StoredTensor:
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int


def checkpoint_headers(directory: str | Path) -> dict[str, StoredTensor]:
    """Every tensor the checkpoint's safetensors files declare, from their headers only."""
    from orstack.io.safetensors_file import check_safetensors, read_header

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(path)  # a header that does not fit its file is bad input, named
        header, _ = read_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            out[name] = StoredTensor(str(info["dtype"]), tuple(int(d) for d in info["shape"]), int(end) - int(begin))
    return out


def stored_float_bytes(headers: dict[str, StoredTensor], config: Any) -> int:
    """Bytes per value of the checkpoint's floating-point weights (the most common float dtype
    among its tensors, else the config's torch_dtype, else float32)."""
    widths = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
    counts = Counter(t.dtype for t in headers.values() if t.dtype in widths)
    if counts:
        return widths[counts.most_common(1)[0][0]]
    dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
    return TORCH_DTYPE_BYTES.get(dtype.removeprefix("torch."), 4)


def meta_tensors(model: Any) -> dict[str, tuple[int, ...]]:
    """name -> shape of every distinct parameter and buffer to store (a tied weight once)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        key = id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tuple(tensor.shape)
    return out


def keep_row(name: str, shape: tuple[int, ...], width_bytes: int, detail: str = "") -> TensorPlan:
    """A tensor the stage stores unchanged."""
    return TensorPlan(name, shape, "keep", 8.0 * width_bytes, math.prod(shape) * width_bytes, detail)

