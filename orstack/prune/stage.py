"""`prune` as one library call: the stage's typed config and the function the CLI skin calls.

`run_prune(model, tokenizer, config, calib_texts=..., heldout_texts=..., recover_texts=...)`
prunes `model` in place and returns the metrics written into the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.prune.masks import METHODS, check_sparsity, parse_pattern

if TYPE_CHECKING:
    from torch import nn

DEFAULT_SEQLEN = 512
RECOVER_WINDOWS = 256  # windows sampled from --recover text for the fine-tune batches
HELDOUT_FALLBACK_CHARS = 20_000  # perplexity text when no --heldout: the calibration text's start


@dataclass
class PruneConfig:
    """Every option of `orstack prune`; written as the manifest's args."""

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    attn_sparsity: float | None = None
    mlp_sparsity: float | None = None
    nsamples: int = 128
    seqlen: int | None = None  # None: min(512, the model's context)
    batch_size: int = 8
    blocksize: int = 128
    damp: float = 0.01
    gradual: int = 1
    steps: int = 0
    lr: float = 1e-4
    grid: list[float] | None = None
    size_weight: float = 1.0
    compress: bool = True
    prune_lm_head: bool = False
    eval_length: int = 512
    seed: int = 0
    calib: list[str] = field(default_factory=list)
    recover: str | None = None
    heldout: list[str] | None = None

    def validate(self) -> None:
        """Option checks that need no model: run before anything heavy is loaded."""
        if self.method not in METHODS:
            raise BadInput(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        check_sparsity(self.sparsity)
        for option, value in (("--attn-sparsity", self.attn_sparsity), ("--mlp-sparsity", self.mlp_sparsity)):
            if value is not None:
                check_sparsity(value, option)
        for level in self.grid or []:
            check_sparsity(level, "--grid")
        if self.pattern is not None:
            parse_pattern(self.pattern)
            if self.attn_sparsity is not None or self.mlp_sparsity is not None or self.grid:
                raise BadInput("--pattern fixes the sparsity; it cannot be combined with "
                               "--attn-sparsity, --mlp-sparsity or --grid")
            if self.gradual > 1:
                raise BadInput("--gradual needs an unstructured --sparsity target, not --pattern")
        if self.grid and (self.attn_sparsity is not None or self.mlp_sparsity is not None):
            raise BadInput("--grid sets one sparsity for all linears; drop --attn-sparsity/--mlp-sparsity")
        if self.grid is not None and not self.grid:
            raise BadInput("--grid: give at least one level, e.g. 0.5,0.6,0.7")
        if self.gradual < 1:
            raise BadInput(f"--gradual {self.gradual}: must be at least 1")
        if self.steps > 0 and self.recover is None:
            raise BadInput("--steps needs --recover DATA (the text to fine-tune on)")

    def spec(self):  # noqa: ANN201 - PruneSpec
        from orstack.prune.core import PruneSpec

        return PruneSpec(method=self.method, sparsity=self.sparsity,
                         pattern=parse_pattern(self.pattern) if self.pattern else None,
                         attn_sparsity=self.attn_sparsity, mlp_sparsity=self.mlp_sparsity,
                         blocksize=self.blocksize, damp=self.damp, batch_size=self.batch_size,
                         lm_head=self.prune_lm_head)


def parse_grid(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"--grid {text!r}: expected comma-separated sparsities, e.g. 0.5,0.6,0.7") from None
    for level in levels:
        check_sparsity(level, "--grid")
    if not levels:
        raise BadInput("--grid: give at least one level, e.g. 0.5,0.6,0.7")
    return levels


def resolved_seqlen(model: nn.Module, seqlen: int | None) -> int:
    from orstack.io.text import check_seqlen

    if seqlen is None:
        return min(DEFAULT_SEQLEN, getattr(model.config, "max_position_embeddings", DEFAULT_SEQLEN))
    check_seqlen(model, seqlen)
    return seqlen


def run_prune(
    model: nn.Module,
    tokenizer,  # noqa: ANN001 - a transformers tokenizer
    config: PruneConfig,
    *,
    calib_texts: list[str],
    heldout_texts: list[str] | None = None,
    recover_texts: list[str] | None = None,
) -> dict[str, Any]:
    """Prune `model` in place as `config` says; returns the manifest metrics."""
    from orstack.backends.perplexity import perplexity
    from orstack.console import info
    from orstack.io.text import token_windows
    from orstack.layerwise import decoder_layers
    from orstack.prune.pipeline import Schedule, grid_search, prune_with_schedule, stored_bytes

    decoder_layers(model)  # unsupported architectures stop here
    seqlen = resolved_seqlen(model, config.seqlen)
    calib_ids = token_windows(tokenizer, calib_texts, config.nsamples, seqlen, config.seed)
    recover_ids = (token_windows(tokenizer, recover_texts, RECOVER_WINDOWS, seqlen, config.seed + 1)
                   if recover_texts else None)
    ppl_on = "heldout" if heldout_texts else f"calibration text (first {HELDOUT_FALLBACK_CHARS:,} characters)"
    eval_texts = heldout_texts or ["\n".join(calib_texts)[:HELDOUT_FALLBACK_CHARS]]
    eval_length = min(config.eval_length, getattr(model.config, "max_position_embeddings", config.eval_length))

    def evaluate(m: nn.Module) -> float:
        return perplexity(m, tokenizer, eval_texts, max_length=eval_length).ppl

    schedule = Schedule(gradual=config.gradual, recover_steps=config.steps if recover_ids is not None else 0,
                        lr=config.lr, seed=config.seed)
    start = time.perf_counter()
    ppl_before = evaluate(model)
    info(f"perplexity before pruning: {ppl_before:.3f} ({ppl_on})")
    spec = config.spec()
    grid_rows = None
    prune_start = time.perf_counter()
    if config.grid:
        outcome, grid_rows = grid_search(model, calib_ids, spec, schedule, config.grid, evaluate,
                                         compress=config.compress, size_weight=config.size_weight,
                                         recover_ids=recover_ids)
        ppl_after = next(r["ppl"] for r in grid_rows if r["best"])
        _grid_table(grid_rows, config.size_weight)
    else:
        outcome = prune_with_schedule(model, calib_ids, spec, schedule, recover_ids=recover_ids,
                                      evaluate=evaluate if config.gradual > 1 else None)
        ppl_after = outcome.stages[-1]["ppl"] if "ppl" in outcome.stages[-1] else evaluate(model)
    prune_seconds = time.perf_counter() - prune_start
    stored, dense = stored_bytes(model, config.compress)
    info(f"sparsity {outcome.report.sparsity:.4f}, perplexity {ppl_before:.3f} -> {ppl_after:.3f}")
    metrics: dict[str, Any] = {
        "method": config.method,
        "pattern": spec.pattern_text,
        "sparsity": outcome.report.sparsity,
        "layer_sparsity": outcome.report.layers,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_on": ppl_on,
        "ppl_max_length": eval_length,
        "nsamples": config.nsamples,
        "seqlen": seqlen,
        "weight_bytes": stored,
        "dense_weight_bytes": dense,
        "prune_seconds": round(prune_seconds, 2),  # pruning (and recovery, grid), without load and ppl
        "seconds": round(time.perf_counter() - start, 2),
    }
    if config.gradual > 1 or schedule.recover_steps:
        metrics["stages"] = outcome.stages
    if grid_rows is not None:
        metrics["grid"] = grid_rows
    return metrics


def _grid_table(rows: list[dict[str, Any]], size_weight: float) -> None:
    from orstack import console

    tbl = console.new_table("sparsity", "achieved", "ppl", "size", "score", "kept",
                            title=f"grid: score = -ln(ppl) - {size_weight} x size")
    for r in rows:
        tbl.add_row(f"{r['sparsity']:.2f}", f"{r['achieved']:.3f}", f"{r['ppl']:.3f}",
                    f"{r['size_fraction']:.1%}", f"{r['score']:.4f}", "yes" if r["best"] else "")
    console.table(tbl)
