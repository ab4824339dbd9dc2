"""Losses on response tokens only; a row with no response token contributes 0, never NaN."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE = -100  # the label of a position the loss skips (the prompt, padding): PyTorch's ignore_index


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1."""
    return logits[:, :-1, :], labels[:, 1:]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token cross-entropy [b, t-1], mask of positions that count)."""
    import torch.nn.functional as F

    logits, labels = shift(logits, labels)
    mask = labels != IGNORE
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.clamp_min(0).reshape(-1),
                         reduction="none").view(labels.shape)
    return ce * mask, mask


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over counted tokens, each row's tokens scaled by its weight.

    The denominator is clamped to 1, so a batch whose rows are all fully masked gives 0 with
    a valid (zero) gradient instead of 0/0."""
    ce, mask = token_losses(logits, labels)
    if weights is not None:
        ce = ce * weights.to(ce.dtype)[:, None]
    return ce.sum() / mask.sum().clamp_min(1)


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits any loss reads: those predicting a counted token (labels
    shifted by one) in at least one row. Prompt and padding positions are never scored, so a
    model asked for logits only here (transformers' `logits_to_keep`) skips most of the output
    projection and the vocabulary-wide softmax."""
    import torch

    return torch.nonzero((labels[:, 1:] != IGNORE).any(0)).flatten()


def ce_sum_at(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """The summed (row-weighted) cross-entropy of `logits` computed only at `positions`
    ([b, len(positions), vocab], as `logits_to_keep=positions` returns them) against the
    tokens that follow those positions. Divided by the batch's counted tokens it equals
    masked_ce on full logits."""
    import torch.nn.functional as F

    target = labels[:, positions + 1]
    mask = target != IGNORE
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.clamp_min(0).reshape(-1),
                         reduction="none").view(target.shape) * mask
    if weights is not None:
        ce = ce * weights.to(ce.dtype)[:, None]
    return ce.sum()


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row over its own counted tokens (0 for a fully masked row)."""
    ce, mask = token_losses(logits, labels)
    return ce.sum(1) / mask.sum(1).clamp_min(1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as trl defines it:
    beta = 0 is forward KL(teacher || student), beta = 1 is reverse KL(student || teacher), in
    between JSD_beta against the mixture beta * teacher + (1 - beta) * student. Logits are divided
    by `temperature`; the mean is over response tokens (labels != -100, aligned like the CE)."""
    import torch
    import torch.nn.functional as F

    student_logits, labels = shift(student_logits, labels)
    teacher_logits = teacher_logits[:, :-1, :]
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        div = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        div = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        mixture = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        div = b * F.kl_div(mixture, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mixture, s, reduction="none", log_target=True)
    mask = labels != IGNORE
    return div.sum(-1)[mask].sum() / mask.sum().clamp_min(1)
