"""A safetensors file written one tensor at a time.

The header (names, dtypes, shapes, byte ranges) is known from the inputs' headers before any
tensor is merged, so it is written first and each merged tensor follows as soon as it exists:
the writer never holds more than the tensor it is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from orstack.io.safetensors_file import DTYPE_BYTES

TORCH_TO_SAFETENSORS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                        torch.uint8: "U8", torch.bool: "BOOL"}
SAFETENSORS_TO_TORCH = {v: k for k, v in TORCH_TO_SAFETENSORS.items()}


def write_streamed(path: Path, specs: list[tuple[str, str, list[int]]],
                   tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Write `tensors` (in `specs` order: name, safetensors dtype, shape) to `path`; bytes written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, tensor), (want, dtype, shape) in zip(tensors, specs, strict=True):
            if name != want or TORCH_TO_SAFETENSORS.get(tensor.dtype) != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{path}: tensor '{name}' {tensor.dtype} {list(tensor.shape)} does not match the "
                               f"header's '{want}' {dtype} {shape}")
            f.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(raw) + offset
