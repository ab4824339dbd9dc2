"""SparseGPT (Frantar & Alistarh, 2023): prune and update a weight matrix so the layer's
output on calibration inputs changes as little as possible.

For the layer-wise error ||WX - ŴX||², removing weight w_q of a row and compensating
optimally with the remaining weights of that row (Optimal Brain Surgeon) costs
w_q² / [H⁻¹]_qq and moves the row by -w_q / [H⁻¹]_qq · H⁻¹_{:,q}, with H = XXᵀ. Processing
columns left to right and only updating the columns not yet visited lets every row share
one sequence of inverse Hessians, which the upper Cholesky factor of H⁻¹ gives at once
(row q of the factor is the needed H⁻¹ row after columns < q were eliminated). Columns go
in blocks: the mask of a block is chosen at its start from w² / [chol(H⁻¹)]_qq², updates
inside a block are applied column by column, and the accumulated error is applied to the
rest of the matrix in one matrix product per block (the paper's lazy batch updates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orstack.prune.masks import n_pruned

if TYPE_CHECKING:
    import torch


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean diag(H).

    Channels that never fired (zero diagonal) get a unit diagonal: they carry no signal, so
    their weights cost nothing to prune and the others owe them no compensation. When the
    dampened H is still not positive definite the dampening grows tenfold, up to 3 times.
    """
    import torch

    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = torch.diag(h).mean()
    for attempt in range(4):
        try:
            lower = torch.linalg.cholesky(h + damp * (10**attempt) * mean_diag * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("SparseGPT: the calibration Hessian is not positive definite even with 1000x dampening")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.0,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [rows, cols] given H = XᵀX/n [cols, cols]; returns (new weight, keep mask).

    Unstructured: every row loses round(cols · sparsity) weights; each block takes what the
    row still owes the cumulative target at the block's end, so the totals are exact. Pattern (N, M): the
    N lowest-scoring weights of each group of M are chosen when the group's first column is
    reached (after the updates from earlier columns, as in the paper). `forced` marks weights
    that must be pruned (already zero from an earlier stage).
    """
    import torch

    threads = torch.get_num_threads()
    # the column loop is thousands of tiny operations: extra threads only add synchronisation
    # (5x slower with 2 threads than with 1 on a loaded 2-core machine)
    torch.set_num_threads(1)
    try:
        return _sparsegpt(weight, hessian, sparsity, pattern, blocksize, damp, forced)
    finally:
        torch.set_num_threads(threads)


def _sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None,
    blocksize: int,
    damp: float,
    forced: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    rows, cols = weight.shape
    w = weight.detach().float().clone()
    hinv = inverse_hessian_factor(hessian.to(w.device), damp)
    keep = torch.ones_like(w, dtype=torch.bool)
    done = torch.zeros(rows, dtype=torch.long, device=w.device)  # weights pruned so far, per row
    if pattern is not None:
        # a group of M must not straddle two blocks
        blocksize = max(pattern[1], blocksize - blocksize % pattern[1])

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        h1 = hinv[i1:i2, i1:i2]
        d = torch.diag(h1)
        err1 = torch.zeros_like(w1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        forced1 = forced[:, i1:i2] if forced is not None else None
        if pattern is None:
            # each row prunes what it still owes the cumulative target up to column i2 (never
            # fewer than its forced zeros here), so row totals stay exact across blocks
            owed = n_pruned(i2, sparsity) - done
            if forced1 is not None:
                owed = torch.maximum(owed, forced1.sum(1))
            owed = owed.clamp(0, i2 - i1)
            scores = w1**2 / d.unsqueeze(0) ** 2
            if forced1 is not None:
                scores = scores.masked_fill(forced1, -torch.inf)
            ranks = scores.argsort(dim=1, stable=True).argsort(dim=1)
            keep1 = ranks >= owed.unsqueeze(1)
        if forced1 is not None:
            keep1 &= ~forced1
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                scores = w1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                if forced1 is not None:
                    scores = scores.masked_fill(forced1[:, i:i + m], -torch.inf)
                chosen = scores.topk(n, dim=1, largest=False).indices + i
                keep1.scatter_(1, chosen, False)
            col = w1[:, i]
            pruned = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - pruned) / d[i]
            # OBS update of the not-yet-visited columns of this block
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            w1[:, i] = pruned
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        keep[:, i1:i2] = keep1
        done += (~keep1).sum(1)
    w[~keep] = 0.0
    return w.to(weight.dtype), keep
