"""Recovery that keeps compression: a LoRA trained on a pruned and/or quantized base and
folded back onto it so that the result is as compressed as the base.

Each decoder Linear of the base gets a `Kept` constraint: a keep-mask (the weights that may
be non-zero; pruned ones stay exactly zero) and/or a grid (`snap`: a weight to its nearest
point on the fixed quantization grid the base was stored with). The wrapped Linear computes

    W = W0 + keep * (B @ A) * alpha / r        (the delta is masked: pruned weights never move)
    W = W + (snap(W) - W).detach()             (mode "qat": straight-through rounding)

so the model trains on the weights it will be saved with. In mode "round" the forward pass
uses the unrounded W and the grid is met only when the adapter is folded (post-training
re-quantization). Folding writes snap(W) (masked) into the base Linear in both modes; `verify`
then checks every pruned weight is exactly zero and every weight is on its grid.

The LoRA is orstack's own (not peft's): peft's merge knows neither masks nor grids, and the
constraint has to act inside the forward pass for the training to see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

MODES = ("qat", "round")


@dataclass
class Kept:
    """What one Linear of a compressed base must keep."""

    keep: torch.Tensor | None = None  # bool [out, in]: True where the weight may be non-zero
    snap: Callable[[torch.Tensor], torch.Tensor] | None = None  # weight -> nearest point of its grid


def recovery_linear_class() -> type:
    """The wrapper class, defined on first use (this module imports no torch at import time)."""
    global _RecoveryLinear
    if _RecoveryLinear is not None:
        return _RecoveryLinear
    import torch
    import torch.nn.functional as F  # noqa: N812

    class RecoveryLinear(torch.nn.Module):
        """A frozen base Linear plus a masked LoRA delta, optionally rounded onto the base's grid."""

        def __init__(self, base: nn.Linear, kept: Kept, rank: int, alpha: float, mode: str) -> None:
            super().__init__()
            self.base = base
            self.kept = kept
            self.mode = mode
            self.scaling = alpha / rank
            for p in base.parameters():
                p.requires_grad_(False)
            w = base.weight
            self.lora_A = torch.nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
            self.lora_B = torch.nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's LoRA init: B = 0, so W starts at W0
            if kept.keep is not None:
                self.register_buffer("keep", kept.keep.to(device=w.device), persistent=False)
            else:
                self.keep = None

        def weight_unrounded(self) -> torch.Tensor:
            delta = (self.lora_B @ self.lora_A) * self.scaling
            if self.keep is not None:
                delta = delta * self.keep
            return self.base.weight + delta

        def effective_weight(self) -> torch.Tensor:
            w = self.weight_unrounded()
            if self.mode == "qat" and self.kept.snap is not None:
                w = w + (self.kept.snap(w.detach()) - w).detach()
            return w

        def folded_weight(self) -> torch.Tensor:
            """The weight to save: on the grid, pruned weights zero."""
            with torch.no_grad():
                w = self.weight_unrounded()
                if self.kept.snap is not None:
                    w = self.kept.snap(w)
                if self.keep is not None:
                    w = torch.where(self.keep, w, torch.zeros_like(w))
                return w

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.effective_weight(), self.base.bias)

    _RecoveryLinear = RecoveryLinear
    return RecoveryLinear


_RecoveryLinear: type | None = None


def attach(model: nn.Module, kept: dict[str, Kept], *, rank: int, alpha: float, mode: str) -> list[str]:
    """Freeze `model` and replace each Linear named in `kept` (full module names) by a
    RecoveryLinear; returns the names wrapped. Only the LoRA matrices require gradients."""
    if mode not in MODES:
        from orstack.errors import BadInput

        raise BadInput(f"--recover-mode {mode}: expected one of {', '.join(MODES)}")
    cls = recovery_linear_class()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, constraint in kept.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, cls(getattr(parent, leaf), constraint, rank, alpha, mode))
    return list(kept)


def fold(model: nn.Module) -> dict[str, torch.Tensor]:
    """Put each RecoveryLinear's folded weight into its base Linear and the base back in its
    place; returns the folded weights by module name."""
    import torch

    cls = recovery_linear_class()
    folded = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, cls):
            continue
        w = module.folded_weight()
        base = module.base
        with torch.no_grad():
            base.weight.copy_(w)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, base)
        folded[name] = base.weight
    return folded


def verify(model: nn.Module, kept: dict[str, Kept]) -> dict[str, int]:
    """Check the folded model keeps its compression; RuntimeError otherwise (a bug, not bad
    input). Returns the counts checked."""
    import torch

    zeros = on_grid = 0
    for name, constraint in kept.items():
        w = model.get_submodule(name).weight.detach()
        if constraint.keep is not None:
            moved = int((w[~constraint.keep] != 0).sum())
            if moved:
                raise RuntimeError(f"recovery: {moved} pruned weights of {name} are no longer zero")
            zeros += int((~constraint.keep).sum())
        if constraint.snap is not None:
            if not torch.equal(constraint.snap(w), w):
                raise RuntimeError(f"recovery: weights of {name} are off their quantization grid")
            on_grid += w.numel()
    return {"pruned_zeros_kept": zeros, "weights_on_grid": on_grid}


def lora_parameters(model: nn.Module) -> list[Any]:
    cls = recovery_linear_class()
    return [p for m in model.modules() if isinstance(m, cls) for p in (m.lora_A, m.lora_B)]
