"""Mask-preserving recovery fine-tune: a short AdamW loop on language-modelling loss in
which pruned weights stay exactly zero.

Gradients of pruned weights are masked (so AdamW's moments for them stay zero and its
decoupled weight decay has nothing to shrink), and the mask is re-applied after every step
as well; at the end every pruned weight is checked to be exactly zero. Embeddings and
lm_head stay frozen (they are not pruned, and with tied embeddings they are one tensor).
The loss is also measured on the same fixed windows before and after (`loss_before`,
`loss_after`): the first and last step losses are single random batches, too noisy to
compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class RecoverResult:
    steps: int
    loss_first: float
    loss_last: float
    loss_before: float = float("nan")  # mean loss on the fixed windows FIXED_WINDOWS, before the steps
    loss_after: float = float("nan")  # ... and after them


FIXED_WINDOWS = 16  # windows of `ids` the before/after loss is measured on


def fixed_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean language-modelling loss of `model` on the first FIXED_WINDOWS windows of `ids`."""
    import torch

    device = next(model.parameters()).device
    windows = ids[:FIXED_WINDOWS]
    total = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i:i + batch_size].to(device)
            total += model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
    model.train(was_training)
    return total / windows.shape[0]


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """Decoder layers and the final norm: everything but embeddings and lm_head."""
    from orstack.architectures import final_norm
    from orstack.layerwise import decoder_layers

    params = list(decoder_layers(model).parameters())
    norm = final_norm(model)
    if norm is not None:
        params += list(norm.parameters())
    return params


def recover(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
) -> RecoverResult:
    """Fine-tune `model` in place on windows `ids` [n, seq] for `steps` AdamW steps (orstack.train.loop)."""
    import torch

    from orstack.layerwise import decoder_layers, linear_modules
    from orstack.train.loop import train_loop

    pruned = []  # (weight, keep mask) of every decoder-layer Linear
    for layer in decoder_layers(model):
        for module in linear_modules(layer).values():
            pruned.append((module.weight, module.weight.detach() != 0))
    params = trainable_parameters(model)
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    saved_grad = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    loss_before = fixed_loss(model, ids, batch_size)
    hooks = [w.register_hook(lambda g, keep=keep: g * keep) for w, keep in pruned]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device

    def step(_: int) -> dict[str, float]:
        rows = torch.randint(0, ids.shape[0], (min(batch_size, ids.shape[0]),), generator=generator)
        batch = ids[rows].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        return {"loss": loss.item()}

    def reapply_masks() -> None:
        with torch.no_grad():
            for w, keep in pruned:
                w.mul_(keep)

    try:
        losses = train_loop(model, optimizer, params, steps, step, max_grad_norm=1.0, after_step=reapply_masks,
                            desc="recover").losses
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(frozen, saved_grad):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
    for w, keep in pruned:
        if bool((w.detach()[~keep] != 0).any()):
            raise RuntimeError("recovery fine-tune changed a pruned weight; the mask was not preserved")
    return RecoverResult(steps=steps, loss_first=losses[0] if losses else float("nan"),
                         loss_last=losses[-1] if losses else float("nan"), loss_before=loss_before,
                         loss_after=fixed_loss(model, ids, batch_size))
