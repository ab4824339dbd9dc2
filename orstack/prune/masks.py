"""Which weights to prune: scores and masks.

Masks are boolean tensors shaped like the weight, True where a weight is *kept*.
Unstructured sparsity is chosen per output row (every row loses the same number of
weights, Wanda's comparison group); an N:M pattern removes exactly N weights in every
group of M consecutive input weights (SparseGPT's convention: 2:4 = two zeros per four).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orstack.errors import BadInput

if TYPE_CHECKING:
    import torch

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): N zeros in every group of M, 0 < N < M."""
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise BadInput(f"--pattern {text!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise BadInput(f"--pattern {text}: N zeros in every group of M needs 0 < N < M")
    return n, m


def check_sparsity(value: float, option: str = "--sparsity") -> float:
    if not 0.0 <= value < 1.0:
        raise BadInput(f"{option} {value}: must be in [0, 1)")
    return value


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2, compared within each output row i."""
    return weight.abs().float() * input_norm.float().unsqueeze(0)


def n_pruned(columns: int, sparsity: float) -> int:
    return int(round(columns * sparsity))


def row_mask(scores: torch.Tensor, sparsity: float, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask removing the round(cols * sparsity) lowest scores of every row.

    `forced` (True = must be pruned, e.g. weights already zero from an earlier stage) are
    pruned whatever their score, so a gradual schedule never brings a weight back.
    """
    import torch

    if forced is not None:
        scores = scores.masked_fill(forced, -torch.inf)
    k = n_pruned(scores.shape[1], sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    if forced is not None:
        keep &= ~forced
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the N lowest scores of every group of M consecutive inputs pruned.

    Vectorised: the rows are viewed as [rows, cols/M, M] and one topk picks every group's
    losers at once.
    """
    import torch

    rows, cols = scores.shape
    if cols % m:
        raise BadInput(f"pattern {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2, largest=False).indices, False)
    return keep.reshape(rows, cols)


def check_nm(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> None:
    """Every group of M consecutive input weights holds at least N zeros (at most M-N non-zeros,
    what 2:4 sparse kernels need); anything else is an error, never a silent result."""
    rows, cols = weight.shape
    if cols % m:
        raise RuntimeError(f"{name}: width {cols} is not a multiple of {m}")
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    bad = int((zeros < n).sum())
    if bad:
        raise RuntimeError(f"{name}: {bad} groups of {m} hold fewer than {n} zeros; the {n}:{m} pattern is violated")


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()
