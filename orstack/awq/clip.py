"""Output error of a quantized weight, and AWQ's per-group clipping search.

With G = XᵀX/n (the layer input's second moment, collected once), the mean squared
output error of replacing W by Ŵ is tr(Δ G Δᵀ) with Δ = Ŵ - W: no activations need to be
kept, and every candidate costs one [out, in] x [in, in] product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orstack.awq.grid import QuantSpec, fake_quantize

if TYPE_CHECKING:
    import torch


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ over rows of δ G δᵀ: the summed squared output error per calibration token."""
    import torch

    d = delta.float()
    return float(((d @ gram.float()) * d).sum(dtype=torch.float64))


def group_errors(delta: torch.Tensor, gram_blocks: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per (row, group) error δ_g G_gg δ_gᵀ, using only G's diagonal blocks (as AWQ's clip
    search treats each group alone): [out, n_groups]."""
    import torch

    d = delta.reshape(delta.shape[0], -1, group_size)
    return torch.einsum("rgi,gij,rgj->rg", d, gram_blocks, d)


def diagonal_blocks(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """G's [n_groups, group, group] diagonal blocks."""
    import torch

    n = gram.shape[0] // group_size
    return torch.stack([gram[i * group_size:(i + 1) * group_size, i * group_size:(i + 1) * group_size]
                        for i in range(n)])


def search_clip(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, steps: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """The clipping ratio per (row, group) in {1, 1 - 1/steps, ..., 1 - max_shrink} that minimises
    that group's output error; ratio 1 (plain RTN) is always a candidate, so clipping never
    makes a group worse on the calibration data."""
    import torch

    blocks = diagonal_blocks(gram.float(), spec.group_size)
    best_ratio = torch.ones(w.shape[0], w.shape[1] // spec.group_size, dtype=w.dtype, device=w.device)
    best_err = torch.full_like(best_ratio, float("inf"))
    n_candidates = int(round(max_shrink * steps))
    for i in range(n_candidates + 1):
        ratio = 1.0 - i / steps
        err = group_errors(fake_quantize(w, spec, ratio) - w, blocks, spec.group_size)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio
