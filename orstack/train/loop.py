"""The one training loop: tiny's pre-training, supervised fine-tuning and prune's recovery.

Each step sets the learning rate, clears the gradients, runs the caller's `step` (forward
and backward over its batch or micro-batches; it returns the step's figures, `loss` among
them), clips the gradient norm, steps the optimizer and runs `after_step` (prune re-applies
its masks there). The caller owns the data, the loss and the optimizer; the loop owns the
order of those operations, the progress display and the model's train/eval mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class LoopResult:
    steps: int
    losses: list[float]  # the loss of every step
    seconds: float


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    steps: int,
    step: Callable[[int], dict[str, Any]],
    *,
    lr_at: Callable[[int], float] | None = None,
    max_grad_norm: float = 1.0,
    after_step: Callable[[], None] | None = None,
    on_step: Callable[[int, dict[str, Any]], bool | None] | None = None,
    desc: str = "training",
) -> LoopResult:
    """Train `model` in place for `steps` optimizer steps; `params` are the clipped parameters.

    `lr_at(step)` sets every parameter group's learning rate (None: the optimizer's own);
    `on_step(step, figures)` sees the step's figures plus `grad_norm` and `lr`, and ends the
    loop early by returning True. The model is
    in training mode during the loop and back in its previous mode afterwards."""
    import torch

    from orstack.console import progress

    was_training = model.training
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    try:
        with progress() as bar:
            task = bar.add_task(desc, total=steps, unit="steps")
            for i in range(steps):
                if lr_at is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(i)
                optimizer.zero_grad(set_to_none=True)
                figures = step(i)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                if after_step is not None:
                    after_step()
                losses.append(figures["loss"])
                bar.update(task, advance=1, description=f"{desc} loss {figures['loss']:.4f}")
                if on_step is not None and on_step(
                        i, {**figures, "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"]}):
                    break  # the caller stops early (validation patience used up)
    finally:
        model.train(was_training)
    return LoopResult(len(losses), losses, time.perf_counter() - start)
