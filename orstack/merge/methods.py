"""The merge methods, each a short function on one tensor name at a time.

Every function takes the inputs' tensors of one name (and the base's, for the task-vector
methods) and returns the merged tensor in float32; the caller casts it back. Names follow the
papers: a task vector is tau_i = theta_i - theta_base (Ilharco et al. 2023, "Editing models with
task arithmetic"); TIES trims each task vector to its largest-magnitude `density` share, elects
a sign per entry and averages only the entries that agree (Yadav et al. 2023); DARE drops each
entry with probability 1 - density and rescales the survivors by 1 / density (Yu et al. 2024);
SLERP interpolates along the great circle between two weight vectors (Shoemake 1985).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

# Below this angle the two directions are parallel to float32 precision and sin(omega) ~ 0:
# SLERP's formula divides by it, and linear interpolation is then the same curve.
PARALLEL_EPS = 1e-6


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean: sum w_i theta_i / sum w_i."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.float(), alpha=w / total)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """sin((1-t) omega)/sin(omega) a + sin(t omega)/sin(omega) b, omega the angle between a and b
    (flattened). Parallel or zero vectors fall back to (1-t) a + t b."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm().double().item(), b32.norm().double().item()
    if na == 0.0 or nb == 0.0:
        return a32 * (1.0 - t) + b32 * t
    cos = (a32.flatten().double() @ b32.flatten().double()).item() / (na * nb)
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > 1.0 - PARALLEL_EPS:
        return a32 * (1.0 - t) + b32 * t
    omega = math.acos(cos)
    s0 = math.sin((1.0 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return a32 * s0 + b32 * s1


def slerp_norm(na: float, nb: float, cos: float, t: float) -> float:
    """The norm SLERP's formula gives, from the ends' norms and the cosine between them: with
    equal norms it is that norm for every t (the point stays on the sphere)."""
    omega = math.acos(cos)
    s0 = math.sin((1.0 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return math.sqrt(s0 * s0 * na * na + s1 * s1 * nb * nb + 2.0 * s0 * s1 * na * nb * cos)


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    b = base.float()
    return [t.float() - b for t in tensors]


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    lam: float) -> torch.Tensor:
    """theta_base + lambda sum w_i tau_i."""
    out = torch.zeros_like(base, dtype=torch.float32)
    for tau, w in zip(task_vectors(base, tensors), weights):
        out.add_(tau, alpha=w)
    return base.float() + lam * out


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """tau with all but its round(density * n) largest-magnitude entries set to zero (TIES' trim)."""
    n = tau.numel()
    k = int(round(density * n))
    if k >= n:
        return tau
    flat = tau.flatten()
    kept = torch.zeros_like(flat)
    if k > 0:
        index = flat.abs().topk(k).indices
        kept[index] = flat[index]
    return kept.view_as(tau)


def disjoint_merge(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' elect and merge: the sign of sum w_i tau_i per entry, then the weighted mean of the
    entries (nonzero) whose sign agrees with it; 0 where none agrees."""
    total = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        total.add_(tau, alpha=w)
    sign = torch.sign(total)
    numerator = torch.zeros_like(total)
    denominator = torch.zeros_like(total)
    for tau, w in zip(taus, weights):
        agree = ((torch.sign(tau) == sign) & (tau != 0)).float()
        numerator.add_(tau * agree, alpha=w)
        denominator.add_(agree, alpha=w)
    return torch.where(denominator != 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(total))


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
         lam: float) -> torch.Tensor:
    taus = [trim(tau, d) for tau, d in zip(task_vectors(base, tensors), densities)]
    return base.float() + lam * disjoint_merge(taus, weights)


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A seed for one input's tensor: the same drop whatever order tensors are streamed in."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_mask(shape: Sequence[int], density: float, seed: int) -> torch.Tensor:
    """DARE's random keep mask (True = kept), each entry kept with probability `density`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator) < density


def dare(tau: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Drop entries with probability 1 - density, scale the rest by 1 / density."""
    if density >= 1.0:
        return tau
    return tau * drop_mask(tau.shape, density, seed).float() / density


def dare_taus(base: torch.Tensor, tensors: Sequence[torch.Tensor], densities: Sequence[float], seed: int,
              name: str) -> list[torch.Tensor]:
    return [dare(tau, d, tensor_seed(seed, name, i))
            for i, (tau, d) in enumerate(zip(task_vectors(base, tensors), densities))]


def dare_linear(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], lam: float, seed: int, name: str) -> torch.Tensor:
    out = torch.zeros_like(base, dtype=torch.float32)
    for tau, w in zip(dare_taus(base, tensors, densities, seed, name), weights):
        out.add_(tau, alpha=w)
    return base.float() + lam * out


def dare_ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
              densities: Sequence[float], lam: float, seed: int, name: str) -> torch.Tensor:
    return base.float() + lam * disjoint_merge(dare_taus(base, tensors, densities, seed, name), weights)
