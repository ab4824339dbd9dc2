"""The prune stage as a whole: gradual schedules with recovery, and the sparsity grid.

- Gradual: K stages reach the target in equal steps (65% in 4: 16.25, 32.5, 48.75, 65%);
  after each stage an optional mask-preserving recovery fine-tune, then a perplexity.
  Weights pruned in a stage stay pruned in every later one.
- Grid: each sparsity level is run from the same starting weights; the kept level has the
  highest score = -ln(ppl) - size_weight * stored_bytes / dense_bytes, i.e. quality minus a
  size penalty; with size_weight 1, shrinking the file by 10% of its dense size is worth a
  perplexity rise of about 10.5% (e^0.1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from orstack.prune.core import PruneReport, PruneSpec, model_sparsity, prune_model

if TYPE_CHECKING:
    import torch
    from torch import nn

Evaluate = Callable[["nn.Module"], float]


@dataclass
class Schedule:
    gradual: int = 1  # stages to reach the target
    recover_steps: int = 0  # recovery steps after each stage (0: none)
    lr: float = 1e-4
    recover_batch_size: int = 4
    seed: int = 0


@dataclass
class PruneOutcome:
    report: PruneReport
    stages: list[dict[str, Any]] = field(default_factory=list)


def stage_spec(spec: PruneSpec, fraction: float) -> PruneSpec:
    """The spec of a gradual stage: every sparsity scaled by `fraction` of the target."""
    scale = lambda s: None if s is None else s * fraction  # noqa: E731
    return replace(spec, sparsity=spec.sparsity * fraction, attn_sparsity=scale(spec.attn_sparsity),
                   mlp_sparsity=scale(spec.mlp_sparsity))


def prune_with_schedule(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    spec: PruneSpec,
    schedule: Schedule,
    *,
    recover_ids: torch.Tensor | None = None,
    evaluate: Evaluate | None = None,
) -> PruneOutcome:
    from orstack.console import info
    from orstack.prune.recover import recover

    outcome = PruneOutcome(report=PruneReport())
    stages = 1 if spec.pattern is not None else schedule.gradual
    for stage in range(1, stages + 1):
        start = time.perf_counter()
        stage_target = stage_spec(spec, stage / stages) if stages > 1 else spec
        prune_model(model, calib_ids, stage_target)
        row: dict[str, Any] = {"stage": stage, "target": stage_target.sparsity,
                               "sparsity": model_sparsity(model).sparsity}
        if recover_ids is not None and schedule.recover_steps > 0:
            result = recover(model, recover_ids, steps=schedule.recover_steps, lr=schedule.lr,
                             batch_size=schedule.recover_batch_size, seed=schedule.seed + stage)
            row.update(recover_loss_first=result.loss_first, recover_loss_last=result.loss_last,
                       recover_loss_before=result.loss_before, recover_loss_after=result.loss_after)
        if evaluate is not None:
            row["ppl"] = evaluate(model)
        row["seconds"] = round(time.perf_counter() - start, 2)
        outcome.stages.append(row)
        info(f"stage {stage}/{stages}: sparsity {row['sparsity']:.3f}"
             + (f", ppl {row['ppl']:.3f}" if "ppl" in row else ""))
    outcome.report = model_sparsity(model)
    return outcome


def stored_bytes(model: nn.Module, compress: bool) -> tuple[int, int]:
    """(bytes the weights take in the written file, bytes dense), tensor data only."""
    from orstack.prune.core import masks_of
    from orstack.prune.storage import sparse_bytes, unique_state_dict

    state = unique_state_dict(model)
    sparse_names = set(masks_of(model)) if compress else set()
    dense = stored = 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        dense += size
        stored += min(size, sparse_bytes(t)) if name in sparse_names else size
    return stored, dense


def grid_score(ppl: float, stored: int, dense: int, size_weight: float) -> float:
    return -math.log(ppl) - size_weight * stored / dense


def grid_search(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    spec: PruneSpec,
    schedule: Schedule,
    levels: list[float],
    evaluate: Evaluate,
    *,
    compress: bool = True,
    size_weight: float = 1.0,
    recover_ids: torch.Tensor | None = None,
) -> tuple[PruneOutcome, list[dict[str, Any]]]:
    """Prune at every level from the same weights; leave `model` at the best-scoring level."""
    import torch

    from orstack.console import info

    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows, best, best_state, best_outcome = [], None, None, None
    for level in levels:
        model.load_state_dict(original)
        info(f"grid: sparsity {level}")
        start = time.perf_counter()
        outcome = prune_with_schedule(model, calib_ids, replace(spec, sparsity=level), schedule,
                                      recover_ids=recover_ids)
        ppl = evaluate(model)
        stored, dense = stored_bytes(model, compress)
        row = {"sparsity": level, "achieved": outcome.report.sparsity, "ppl": ppl, "stored_bytes": stored,
               "size_fraction": stored / dense, "score": grid_score(ppl, stored, dense, size_weight),
               "seconds": round(time.perf_counter() - start, 2)}
        rows.append(row)
        if best is None or row["score"] > best["score"]:
            best, best_outcome = row, outcome
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(best_state)
    for row in rows:
        row["best"] = row is best
    return best_outcome, rows
