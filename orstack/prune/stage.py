"""`prune` as one library call: the stage's typed config, `run`, and the pruning of a loaded model.

`run(source, output, PruneConfig(...), runtime)` checks the inputs and the output, loads the
checkpoint, prunes it (`prune_in_place`), writes the result with its manifest and returns a
PruneResult for the command to print.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.layerwise import cleans_staging
from orstack.prune.masks import METHODS, check_sparsity, parse_pattern

if TYPE_CHECKING:
    from torch import nn

    from orstack.runtime import Runtime

DEFAULT_SPARSITY = 0.5  # unstructured, when no --sparsity and no --pattern
DEFAULT_RECOVER_STEPS = 50  # recovery steps per stage with --recover and no --steps
DEFAULT_SEQLEN = 512
DTYPES = ("float32", "bfloat16", "float16")
RECOVER_WINDOWS = 256  # windows sampled from --recover text for the fine-tune batches
HELDOUT_FALLBACK_CHARS = 20_000  # perplexity text when no --heldout: the calibration text's start


@dataclass
class PruneConfig:
    """Every option of `orstack prune` that changes its output; written as the manifest's args.

    `sparsity` None means DEFAULT_SPARSITY; with `pattern` or `grid` it stays None (they fix
    the sparsity themselves), so the manifest records only what was applied. `steps` None means
    DEFAULT_RECOVER_STEPS with `recover`, else 0.
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    attn_sparsity: float | None = None
    mlp_sparsity: float | None = None
    nsamples: int = 128
    seqlen: int | None = None  # None: min(512, the model's context)
    batch_size: int = 8
    blocksize: int = 128
    damp: float = 0.01
    gradual: int = 1
    steps: int | None = None
    lr: float = 1e-4
    grid: list[float] | None = None
    size_weight: float = 1.0
    compress: bool = True
    prune_lm_head: bool = False
    eval_length: int = 512
    dtype: str = "float32"
    seed: int = 0
    calib: list[str] = field(default_factory=list)
    recover: str | None = None
    heldout: list[str] | None = None
    # the quality gate (orstack/gates.py): measured on --heldout and --eval against the parent
    eval_tasks: str | None = None  # --eval: Task JSONL: accuracy before and after
    min_retention: float = 0.97
    max_ppl_rise: float | None = None  # None: the retention read on perplexity
    force: bool = False

    def __post_init__(self) -> None:
        if self.sparsity is None and self.pattern is None and self.grid is None:
            self.sparsity = DEFAULT_SPARSITY
        if self.steps is None:
            self.steps = DEFAULT_RECOVER_STEPS if self.recover is not None else 0

    def validate(self) -> None:
        """Option checks that need no model: run before anything heavy is loaded."""
        if self.method not in METHODS:
            raise BadInput(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        for option, value in (("--attn-sparsity", self.attn_sparsity), ("--mlp-sparsity", self.mlp_sparsity)):
            if value is not None:
                check_sparsity(value, option)
        for level in self.grid or []:
            check_sparsity(level, "--grid")
        levels = self._sparsity_options()
        if self.pattern is not None:
            parse_pattern(self.pattern)
            given = levels + (["--grid"] if self.grid is not None else [])
            if given:
                raise BadInput(f"--pattern {self.pattern} fixes the sparsity; it cannot be combined with "
                               f"{', '.join(given)}")
            if self.gradual > 1:
                raise BadInput("--gradual needs an unstructured --sparsity target, not --pattern")
        elif self.grid is not None and levels:
            raise BadInput(f"--grid tries its own sparsities for all linears; drop {', '.join(levels)}")
        if self.grid is not None and not self.grid:
            raise BadInput("--grid: give at least one level, e.g. 0.5,0.6,0.7")
        if self.gradual < 1:
            raise BadInput(f"--gradual {self.gradual}: must be at least 1")
        if self.steps > 0 and self.recover is None:
            raise BadInput("--steps needs --recover DATA (the text to fine-tune on)")
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype {self.dtype}: expected one of {', '.join(DTYPES)}")
        from orstack.gates import check_limits

        check_limits(min_retention=self.min_retention, max_ppl_rise=self.max_ppl_rise)

    def _sparsity_options(self) -> list[str]:
        """The sparsity options that hold a value (with --pattern or --grid: the ones given)."""
        return [option for option, value in (("--sparsity", self.sparsity), ("--attn-sparsity", self.attn_sparsity),
                                             ("--mlp-sparsity", self.mlp_sparsity)) if value is not None]

    def spec(self):  # noqa: ANN201 - PruneSpec
        from orstack.prune.core import PruneSpec

        pattern = parse_pattern(self.pattern) if self.pattern else None
        # With a pattern the sparsity is N/M (the algorithms read the pattern, not this number).
        sparsity = pattern[0] / pattern[1] if pattern else self.sparsity
        return PruneSpec(method=self.method, sparsity=sparsity, pattern=pattern,
                         attn_sparsity=self.attn_sparsity, mlp_sparsity=self.mlp_sparsity,
                         blocksize=self.blocksize, damp=self.damp, batch_size=self.batch_size,
                         lm_head=self.prune_lm_head)


@dataclass
class PruneResult:
    """What `orstack prune` reports: the output, the manifest's metrics, the weight file's size."""

    output: Path
    metrics: dict[str, Any]
    weights_bytes: int | None  # model.safetensors as written (None when the weights are sharded)


@cleans_staging
def run(source: str | Path, output: str | Path, config: PruneConfig, runtime: Runtime) -> PruneResult:
    """Prune the checkpoint `source` as `config` says and write it to the directory `output`.

    Everything is checked before a weight is loaded: the options, the checkpoint (a decoder made
    of Linears, checked on its config: orstack.architectures; an untied lm_head for
    --prune-lm-head), the text files, the output path and the device.
    """
    from orstack.architectures import check_config as check_architecture
    from orstack.gates import decide, load_eval_tasks, measure_tasks, retention_checks
    from orstack.io.checkpoint import can_stream, load_config, load_model, resolve_checkpoint, save_checkpoint
    from orstack.io.output import check_output
    from orstack.io.text import check_text_files, read_texts
    from orstack.layerwise import Staging, decoder_layers, load_streamed, weightless_model
    from orstack.prune.core import check_pattern_fits, masks_of
    from orstack.prune.storage import FORMAT, WEIGHTS, save_sparse
    from orstack.prune.streamed import can_stream_prune, prune_streamed
    from orstack.runtime import seed_everything

    config.validate()
    checkpoint = resolve_checkpoint(source)
    if not isinstance(checkpoint, Path):
        raise BadInput(f"{source}: no such checkpoint directory")
    check_text_files(config.calib, "--calib")
    if config.heldout:
        check_text_files(config.heldout, "--heldout")
    if config.recover is not None:
        check_text_files([config.recover], "--recover")
    eval_tasks = load_eval_tasks(config.eval_tasks) if config.eval_tasks else None
    output = Path(output)
    check_output(output, kind="dir", option="-o", inputs=[checkpoint])
    model_config = load_config(checkpoint)
    check_architecture(model_config, str(checkpoint))
    if config.prune_lm_head and getattr(model_config, "tie_word_embeddings", False):
        raise BadInput(f"--prune-lm-head: {checkpoint}: lm_head is tied to the input embeddings; "
                       "pruning it would prune them too")
    if config.pattern is not None:  # an input width that M does not divide, named before loading
        check_pattern_fits(decoder_layers(weightless_model(model_config)), config.spec())
    device = runtime.torch_device()

    calib_texts = list(read_texts(config.calib))
    heldout_texts = list(read_texts(config.heldout)) if config.heldout else None
    recover_texts = list(read_texts(config.recover)) if config.recover else None
    # A one-stage prune of safetensors weights reads the model layer by layer (same output).
    staging = Staging(output) if runtime.stream and can_stream_prune(config) and can_stream(checkpoint) else None
    if staging is not None:
        model, tokenizer = load_streamed(checkpoint, device=device, dtype=config.dtype)
    else:
        model, tokenizer = load_model(checkpoint, device=device, dtype=config.dtype,
                                      trust_pickle=runtime.trust_pickle)
    seed_everything(config.seed)
    parent_score = measure_tasks(model, tokenizer, eval_tasks, name="parent") if eval_tasks else None
    if staging is not None:
        model, metrics = prune_streamed(model, tokenizer, config, staging.path, calib_texts=calib_texts,
                                        heldout_texts=heldout_texts)
    else:
        metrics = prune_in_place(model, tokenizer, config, calib_texts=calib_texts, heldout_texts=heldout_texts,
                                 recover_texts=recover_texts)
    child_score = measure_tasks(model, tokenizer, eval_tasks, name="pruned") if eval_tasks else None
    if eval_tasks:
        metrics["eval_before"], metrics["eval_after"] = parent_score.as_dict(), child_score.as_dict()
    verdict = decide("prune", retention_checks(
        min_retention=config.min_retention, max_ppl_rise=config.max_ppl_rise,
        ppl=(metrics["ppl_before"], metrics["ppl_after"]) if heldout_texts else None,
        tasks=(parent_score, child_score) if eval_tasks else None, eval_on=config.eval_tasks or ""), config.force)
    write_weights, extra = None, None
    if staging is not None:
        write_weights = staging.move_weights
        extra = {"weights_format": FORMAT} if config.compress else None
    elif config.compress:
        sparse_names = set(masks_of(model))

        def write_weights(tmp: Path) -> None:
            metrics.update(save_sparse(model, tmp, sparse_names))

        extra = {"weights_format": FORMAT}
    extra = {**(extra or {}), "gate": verdict.record()}
    save_checkpoint(model, tokenizer, output, stage="prune", args=config, parent=checkpoint, metrics=metrics,
                    extra=extra, write_weights=write_weights)
    if staging is not None:
        staging.cleanup()
    weights = output / (WEIGHTS if config.compress else "model.safetensors")
    return PruneResult(output, metrics, weights.stat().st_size if weights.exists() else None)


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


@dataclass
class EvaluationSetup:
    """The calibration windows and the perplexity measure of a prune run (in memory or streamed)."""

    seqlen: int
    calib_ids: Any
    ppl_on: str
    eval_length: int
    evaluate: Any  # model -> perplexity
    eval_texts: list[str]  # what `evaluate` scores


def evaluation_setup(model: nn.Module, tokenizer, config: PruneConfig, calib_texts: list[str],  # noqa: ANN001
                     heldout_texts: list[str] | None) -> EvaluationSetup:
    from orstack.backends.perplexity import perplexity
    from orstack.io.text import token_windows

    seqlen = resolved_seqlen(model, config.seqlen)
    calib_ids = token_windows(tokenizer, calib_texts, config.nsamples, seqlen, config.seed)
    ppl_on = "heldout" if heldout_texts else f"calibration text (first {HELDOUT_FALLBACK_CHARS:,} characters)"
    eval_texts = heldout_texts or ["\n".join(calib_texts)[:HELDOUT_FALLBACK_CHARS]]
    eval_length = min(config.eval_length, getattr(model.config, "max_position_embeddings", config.eval_length))

    def evaluate(m: nn.Module) -> float:
        return perplexity(m, tokenizer, eval_texts, max_length=eval_length).ppl

    return EvaluationSetup(seqlen, calib_ids, ppl_on, eval_length, evaluate, eval_texts)


def prune_in_place(
    model: nn.Module,
    tokenizer,  # noqa: ANN001 - a transformers tokenizer
    config: PruneConfig,
    *,
    calib_texts: list[str],
    heldout_texts: list[str] | None = None,
    recover_texts: list[str] | None = None,
) -> dict[str, Any]:
    """Prune `model` in place as `config` says; returns the manifest metrics."""
    from orstack.console import info
    from orstack.io.text import token_windows
    from orstack.prune.pipeline import Schedule, grid_search, prune_with_schedule, stored_bytes

    setup = evaluation_setup(model, tokenizer, config, calib_texts, heldout_texts)
    seqlen, calib_ids, ppl_on, eval_length, evaluate = (setup.seqlen, setup.calib_ids, setup.ppl_on,
                                                         setup.eval_length, setup.evaluate)
    recover_ids = (token_windows(tokenizer, recover_texts, RECOVER_WINDOWS, seqlen, config.seed + 1)
                   if recover_texts else None)

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
    else:
        outcome = prune_with_schedule(model, calib_ids, spec, schedule, recover_ids=recover_ids,
                                      evaluate=evaluate if config.gradual > 1 else None)
        ppl_after = outcome.stages[-1]["ppl"] if "ppl" in outcome.stages[-1] else evaluate(model)
    prune_seconds = time.perf_counter() - prune_start
    stored, dense = stored_bytes(model, config.compress)
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

