"""Which Linears of a decoder layer share an input, and which op's weight a per-channel
scale of that input can be folded into, found by running the layer, not from a table.

1. Sharing: hook every Linear and run the layer once; Linears that receive the very same
   tensor object form a group (q/k/v after the input norm, gate/up after the second norm;
   o and down alone).
2. Folding: for each group, try every other weight in the layer (norm weights first, then
   Linear rows): multiply its output channels by distinct known factors r_k and run the
   layer again. If every channel c of the group's input comes back multiplied by exactly one
   r_k, the input is a per-channel linear function of that op's output channel k, so
   dividing channel k of the op by s_k and multiplying the group's input column c by s_k
   (for all c mapped to k) leaves the layer's function unchanged. This finds the RMSNorm
   weight for q/k/v and gate/up, v_proj's rows for o_proj (with the head repetition of
   grouped-query attention as a many-to-one map) and up_proj's rows for down_proj (whose
   input is act(gate) * up); a LayerNorm with a bias, a gate behind an activation or q/k
   behind a softmax fail the test and are never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# The group's input must equal r_k · x to this relative precision (float32 round-off is ~1e-7).
MATCH_RESIDUAL = 1e-6


@dataclass
class Fold:
    """Where a group's input scale goes: `module` (a name inside the layer) has its output
    channel k divided by s_k; input channel c of the group is produced by channel `source[c]`."""

    module: str
    kind: str  # "norm" (1-D weight) or "rows" (a Linear's output rows)
    source: torch.Tensor  # LongTensor [in_features]
    n_source: int


@dataclass
class LinearGroup:
    names: list[str]  # Linears inside the layer that receive the same input, in call order
    fold: Fold | None


def shared_input_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[list[str]]:
    """Linears that receive the identical input tensor, in the order they are first called."""
    import torch

    from orstack.layerwise import linear_modules

    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        for tensor, names in seen:
            if tensor is args[0]:
                names.append(name)
                return
        seen.append((args[0], [name]))

    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: hook(mod, args, n))
               for name, m in linear_modules(layer).items()]
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [names for _, names in seen]


def _group_input(layer: nn.Module, first: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    import torch

    captured: list[torch.Tensor] = []
    handle = layer.get_submodule(first).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)
    finally:
        handle.remove()
    return captured[0]


def _probe_factors(n: int) -> torch.Tensor:
    """n distinct factors, all > 1 (an op that does not feed the group leaves its input at 1x)."""
    import torch

    return torch.exp(torch.linspace(0.1, 0.7, n, dtype=torch.float64))


def _channel_map(x: torch.Tensor, x_probe: torch.Tensor, factors: torch.Tensor) -> torch.Tensor | None:
    """source[c] if x_probe[:, c] == factors[source[c]] · x[:, c] for every channel c, else None."""
    import torch

    energy = (x * x).sum(0)
    if bool((energy == 0).any()):
        return None  # a silent channel cannot be traced
    ratio = (x_probe * x).sum(0) / energy
    residual = ((x_probe - x * ratio) ** 2).sum(0) / (x_probe * x_probe).sum(0).clamp_min(1e-300)
    if bool((residual > MATCH_RESIDUAL).any()):
        return None
    idx = torch.searchsorted(factors, ratio).clamp(1, len(factors) - 1)
    nearer_lower = (ratio - factors[idx - 1]).abs() < (factors[idx] - ratio).abs()
    source = torch.where(nearer_lower, idx - 1, idx)
    spacing = (factors[1:] - factors[:-1]).min() if len(factors) > 1 else torch.tensor(1.0, dtype=factors.dtype)
    if bool(((factors[source] - ratio).abs() > spacing / 4).any()):
        return None
    return source


def _fold_candidates(layer: nn.Module, group: list[str]) -> list[tuple[str, str]]:
    from torch import nn

    norms, rows = [], []
    for name, module in layer.named_modules():
        weight = module._parameters.get("weight") if name not in group else None
        if weight is None:
            continue
        if weight.ndim == 1:
            norms.append((name, "norm"))
        elif isinstance(module, nn.Linear):
            rows.append((name, "rows"))
    return norms + rows


def find_fold(layer: nn.Module, group: list[str], hidden: torch.Tensor, kwargs: dict[str, Any]) -> Fold | None:
    """The op whose output channels scale the group's input channel by channel (see module doc)."""

    x = _group_input(layer, group[0], hidden, kwargs)
    for name, kind in _fold_candidates(layer, group):
        module = layer.get_submodule(name)
        n = module.weight.shape[0]
        r = _probe_factors(n).to(x.device)  # output channel k is multiplied by r[k]
        saved = {p: getattr(module, p).data.clone() for p in ("weight", "bias") if getattr(module, p, None) is not None}
        try:
            for p in saved:
                shape = (n,) + (1,) * (getattr(module, p).ndim - 1)
                getattr(module, p).data.mul_(r.to(getattr(module, p).dtype).view(shape))
            x_probe = _group_input(layer, group[0], hidden, kwargs)
        finally:
            for p, value in saved.items():
                getattr(module, p).data.copy_(value)
        source = _channel_map(x, x_probe, r)
        if source is not None:
            return Fold(module=name, kind=kind, source=source, n_source=n)
    return None


def discover(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[LinearGroup]:
    """The layer's Linear groups with their fold targets, from a short probe input."""
    return [LinearGroup(names, find_fold(layer, names, hidden, kwargs))
            for names in shared_input_groups(layer, hidden, kwargs)]
