"""Group-wise integer quantization of a weight matrix, in compressed-tensors' convention.

Each row of W [out, in] is cut into groups of `group_size` consecutive input weights; a
group g has a scale and (asymmetric) an integer zero point, and its weights become codes

    q = clamp(round(w / scale + zp), qmin, qmax),   w ≈ (q - zp) · scale

with signed codes qmin = -2^(bits-1), qmax = 2^(bits-1) - 1, exactly as compressed-tensors'
pack-quantized format stores them; dequantization repeats its arithmetic operation for
operation, so a packed checkpoint loads back to bit-identical weights.

The range of every group always contains 0, so a zero weight (a pruned one) gets the code
zp and dequantizes to exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orstack.errors import BadInput

if TYPE_CHECKING:
    import torch

BITS = (3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


@dataclass
class Quantized:
    """Codes [out, in] (int8), scale [out, in/group] and zero point [out, in/group] (None if symmetric)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.spec, dtype)


def group_params(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, ...]:
    """Scale and zero point per group of `w` [out, in] (zero point None when symmetric).

    `clip` (a float or [out, in/group]) shrinks each group's range towards 0 before the
    grid is laid out: the clipping search picks it per group.
    """
    import torch

    g = w.reshape(w.shape[0], -1, spec.group_size)
    clip = torch.as_tensor(clip, dtype=w.dtype, device=w.device)
    lo = g.amin(-1).clamp(max=0) * clip
    hi = g.amax(-1).clamp(min=0) * clip
    if spec.symmetric:
        # compressed-tensors' symmetric grid: amax maps to half the code range.
        scale = torch.maximum(hi, -lo) / ((spec.qmax - spec.qmin) / 2)
        zero_point = None
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    # An all-zero group (e.g. fully pruned) has no range: any positive scale codes it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not spec.symmetric:
        zero_point = torch.round(spec.qmin - lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0) -> Quantized:
    """Round-to-nearest codes of `w` on the group grid (optionally clipped per group)."""
    check_divisible(w.shape[1], spec.group_size, "weight")
    scale, zero_point = group_params(w, spec, clip)
    return quantize_on(w, scale, zero_point, spec)


def quantize_on(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> Quantized:
    """Round-to-nearest codes of `w` on a given grid (scale and zero point per group): how a
    recovered model goes back onto the grid it was read with."""
    import torch

    g = w.reshape(w.shape[0], -1, spec.group_size)
    scaled = g / scale.unsqueeze(-1)
    if zero_point is not None:
        scaled = scaled + zero_point.to(scale.dtype).unsqueeze(-1)
    codes = torch.round(torch.clamp(scaled, spec.qmin, spec.qmax)).to(torch.int8).reshape(w.shape)
    zp = zero_point.to(torch.int8) if zero_point is not None else None
    return Quantized(codes, scale, zp, spec)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """(q - zp) · scale, in the scale's dtype, with compressed-tensors' order of operations."""
    out_features, in_features = codes.shape
    q = codes.reshape(out_features, -1, spec.group_size).to(scale.dtype)
    if zero_point is not None:
        q = q - zero_point.to(scale.dtype).unsqueeze(-1)
    w = (q * scale.unsqueeze(-1)).reshape(out_features, in_features)
    return w.to(dtype) if dtype is not None else w


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    return quantize(w, spec, clip).dequantize(w.dtype)


def check_divisible(width: int, group_size: int, name: str) -> None:
    if width % group_size:
        raise BadInput(f"{name}: width {width} is not divisible by --group-size {group_size}")


def largest_divisor(width: int, limit: int) -> int:
    """The largest group size <= limit that divides `width` (--group-size auto)."""
    return max(d for d in range(1, min(width, limit) + 1) if width % d == 0)
