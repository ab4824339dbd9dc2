"""GPTQ (Frantar et al. 2022): quantize a Linear column by column, compensating each column's
rounding error in the columns not yet quantized, on the calibration Hessian H = XᵀX/n.

Run after AWQ's scales are folded in (`--method awq+gptq`) the weights are W·diag(s) and H is
the second moment of the scaled input x / s, so the two compose: AWQ decides the grid each
channel gets, GPTQ what each weight rounds to on it. Minimised is the layer's output error
tr(Δ H Δᵀ), the error AWQ's searches minimise too.

- Lazy batches: the update of the columns after a block of `blocksize` is applied once per block
  (a matrix product) instead of once per column; the result is the same up to rounding.
- Groups: a group's scale and zero point are chosen when its first column is reached, on the
  weights as updated so far, with the clipping search on H's diagonal block (clip.py); so the
  codes are stored in compressed-tensors' plain group layout and packed like AWQ's.
- act_order: columns in decreasing H_jj (the most active first). Its groups are then static --
  their grids are chosen on the weights before any update -- so the stored layout stays in
  column order (no g_idx).
- Dampening: λ = damp · mean diag(H) is added to H's diagonal (orstack.prune.sparsegpt, the
  same inverse factor SparseGPT uses).
- A channel that never fired (H_jj = 0) is decoupled by the inverse factor: plain rounding.
- A zero weight of a pruned model stays zero (its code is the zero point) and its value is
  compensated like a rounding error, as SparseGPT does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orstack.awq.clip import search_clip
from orstack.awq.grid import Quantized, QuantSpec, group_params

if TYPE_CHECKING:
    import torch


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                  blocksize: int = 128, act_order: bool = False, clip_steps: int = 20,
                  max_shrink: float = 0.5) -> Quantized:
    """The codes of `weight` [out, in] on `spec`'s group grid, by GPTQ on `hessian` [in, in]."""
    import torch

    from orstack.prune.sparsegpt import inverse_hessian_factor

    w = weight.detach().float().clone()
    rows, cols = w.shape
    g = spec.group_size
    h = hessian.detach().float().clone()
    zero = w == 0  # pruned weights: their code is the zero point whatever the updates do
    n_groups = cols // g
    scale = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device)
    zp = None if spec.symmetric else torch.empty_like(scale)
    col_spec = QuantSpec(spec.bits, g, spec.symmetric)

    def choose_grid(k: int, block: torch.Tensor, h_block: torch.Tensor) -> None:
        clip = search_clip(block, h_block, col_spec, clip_steps, max_shrink)
        s, z = group_params(block, col_spec, clip)
        scale[:, k] = s[:, 0]
        if zp is not None:
            zp[:, k] = z[:, 0]

    if act_order:
        for k in range(n_groups):
            sl = slice(k * g, (k + 1) * g)
            choose_grid(k, w[:, sl], h[sl, sl])
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        perm = torch.arange(cols, device=w.device)
        # a group must not straddle two blocks: its grid is read off the block's updated weights
        blocksize = max(g, blocksize - blocksize % g)
    group_of = perm // g
    w, h_perm, zero = w[:, perm], h[perm][:, perm], zero[:, perm]
    hinv = inverse_hessian_factor(h_perm, damp)
    codes = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        h1 = hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            k = int(group_of[j])
            if not act_order and j % g == 0:
                choose_grid(k, w1[:, i:i + g], h_perm[j:j + g, j:j + g])
            col = w1[:, i]
            s = scale[:, k]
            scaled = col / s
            if zp is not None:
                scaled = scaled + zp[:, k]
            q = torch.round(torch.clamp(scaled, spec.qmin, spec.qmax))
            if zp is not None:
                q = torch.where(zero[:, i1 + i], zp[:, k], q)
                col_hat = (q - zp[:, k]) * s
            else:
                q = torch.where(zero[:, i1 + i], torch.zeros_like(q), q)
                col_hat = q * s
            codes[:, j] = q.to(torch.int8)
            e = (col - col_hat) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return Quantized(out, scale, zp.to(torch.int8) if zp is not None else None, spec)
