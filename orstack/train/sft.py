"""Supervised fine-tuning on responses, optionally with logit distillation, on orstack.train.loop.

AdamW over the trainable parameters (the LoRA matrices, or everything with --full), linear
warm-up then linear, cosine or constant, gradient clipping, gradient accumulation, rows shuffled by the
seed. The loss is the response-token cross-entropy (rows scaled by their `weight`) and,
with a teacher, GKD's generalised JSD on the same tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.train.config import TrainConfig
from orstack.train.data import Encoded, collate
from orstack.train.loop import train_loop

if TYPE_CHECKING:
    from orstack.train.validate import Validator


@dataclass
class DistillLoss:
    """Logit distillation as trl's GKD defines it (beta 0: forward KL, 1: reverse KL)."""

    beta: float = 0.0
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the distillation term; (1 - alpha) weighs the cross-entropy
    t2_scale: bool = False  # multiply the distillation term by temperature^2 (Hinton et al.)


@dataclass
class ReferenceKL:
    """A KL(model || reference) term on the response tokens with its own coefficient, doubled
    whenever a step's KL exceeds `max_kl` so the model is held near the reference (SRL)."""

    beta: float
    max_kl: float | None
    reference: Callable[[Any, Any], Any]  # (input_ids, attention_mask) -> the reference's logits
    raised: int = 0  # times beta was doubled


@dataclass
class TrainResult:
    steps: int
    examples: int
    loss_first: float | None
    loss_last: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # validation, early stopping, mixing figures


def total_steps(n_rows: int, config: TrainConfig) -> int:
    if config.max_steps:
        return config.max_steps
    per_epoch = math.ceil(n_rows / (config.batch_size * config.grad_accum))
    return max(1, math.ceil(config.epochs * per_epoch))


def batches(data: list[Encoded], batch_size: int, seed: int):
    """Endless shuffled batches (a new permutation each pass)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            yield [data[j] for j in order[i:i + batch_size]]


def _endless(data: list[Any], seed: int):
    """One source's rows, reshuffled each pass."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        yield from (data[j] for j in torch.randperm(len(data), generator=g).tolist())


def mixed_batches(sources: list[list[Any]], weights: list[float], batch_size: int, seed: int,
                  drawn: list[int] | None = None):
    """Endless batches whose every row comes from source k with probability weights[k] / sum:
    each source is shuffled on its own, and the draws are reproducible by `seed`. `drawn` counts
    the rows taken from each source."""
    import torch

    g = torch.Generator().manual_seed(seed)
    streams = [_endless(rows, seed + 1 + k) for k, rows in enumerate(sources)]
    probs = torch.tensor(weights, dtype=torch.float64)
    if drawn is not None:
        drawn[:] = [0] * len(sources)
    while True:
        picks = torch.multinomial(probs, batch_size, replacement=True, generator=g).tolist()
        if drawn is not None:
            for k in picks:
                drawn[k] += 1
        yield [next(streams[k]) for k in picks]


def mixture(n_main: int, mix: list[tuple[list[Any], float]], rehearsal: float) -> list[float]:
    """Draw weights of [main data, *mix files]: the main data weighs 1 and each mix file its own
    weight; with --rehearsal f the mix files share f of the draws (split by their weights)."""
    if not mix:
        return [1.0]
    if rehearsal:
        total = sum(w for _, w in mix)
        return [1.0 - rehearsal, *(rehearsal * w / total for _, w in mix)]
    return [1.0, *(w for _, w in mix)]


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    from orstack.train.config import lr_multiplier

    return config.lr * lr_multiplier(step, total, config.warmup_steps, config.lr_scheduler)


def train_sft(model: Any, tokenizer: Any, data: list[Encoded], config: TrainConfig, *,
              teacher: Any = None, distill: DistillLoss | None = None, log_path: str | None = None,
              rank: int = 0, world_size: int = 1, on_log: Callable[[dict[str, Any]], None] | None = None,
              progress_desc: str = "training", mix: list[tuple[list[Encoded], float]] | None = None,
              validator: Validator | None = None, reference_kl: ReferenceKL | None = None) -> TrainResult:
    """Train `model` in place on encoded rows (orstack.train.loop); returns the loss trajectory.
    `log_path` gets one JSONL row per `config.log_every` steps (on rank 0). With `world_size` > 1
    (torchrun; torch's process group started by orstack.train.distributed.init_distributed) this
    process trains on its `rank`'s slice of every batch. `mix` adds (rows, weight) sources drawn
    beside `data` (see `mixture`); `validator` measures the model every `config.eval_every` steps
    and at the end, may stop training early, and puts the best weights back with --save-best."""
    import torch

    from orstack.train.losses import IGNORE, ce_sum_at, generalized_jsd, masked_ce, response_positions

    if not data:
        raise BadInput("no training rows")
    world = world_size
    if rank != 0:
        from orstack.console import set_quiet

        set_quiet(True)
    # Each optimizer step consumes batch_size x grad_accum x world rows; every process draws the
    # same global batches (same seed) and takes its own slice, and DDP averages the gradients.
    weights = mixture(len(data), mix or [], config.rehearsal)
    # An epoch is a pass over the main data: with mixing, its rows are only a share of the draws.
    rows_per_epoch = math.ceil(len(data) * sum(weights) / weights[0])
    steps = total_steps(rows_per_epoch, config) if config.max_steps else max(1, math.ceil(
        total_steps(rows_per_epoch, config) / world))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadInput("nothing to train: no parameter requires a gradient")
    # foreach: one multi-tensor update instead of a Python loop over the ~400 LoRA matrices
    # (torch picks it only for CUDA tensors; on CPU the loop was ~9% of a SmolLM2 LoRA step)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    drawn: list[int] = []
    if mix:
        stream = mixed_batches([data, *(rows for rows, _ in mix)], weights, config.batch_size * world, config.seed,
                               drawn)
    else:
        stream = batches(data, config.batch_size * world, config.seed)
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model)

    # Plain cross-entropy (no teacher, no reference, one process) takes the fast path: the
    # batch split into micro-batches of similar length and logits only at response positions;
    # the same rows and the same loss, without the padding and the prompt positions' logits.
    fast = teacher is None and reference_kl is None and world == 1 and accepts_logits_to_keep(model)

    def fast_step(rows: list[Encoded]) -> tuple[float, int]:
        counted = sum(e.counted() for e in rows)
        ce_total = 0.0
        for chunk in length_chunks(rows):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            positions = response_positions(batch["labels"])
            if positions.numel() == 0:
                continue
            out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          logits_to_keep=positions)
            part = ce_sum_at(out.logits, batch["labels"], positions, batch["weights"]) / max(counted, 1)
            (part / config.grad_accum).backward()
            ce_total += part.item()
        return ce_total, counted

    def step(_: int) -> dict[str, Any]:
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "kl": 0.0, "tokens": 0}
        for _ in range(config.grad_accum):
            rows = next(stream)[rank::world] or [Encoded([pad_id], [IGNORE], 0.0)]
            if fast:
                ce_value, counted = fast_step(rows)
                sums["loss"] += ce_value / config.grad_accum
                sums["ce"] += ce_value / config.grad_accum
                sums["tokens"] += counted
                continue
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            ce = masked_ce(out.logits, batch["labels"], batch["weights"])
            loss = ce
            if teacher is not None and distill is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                vocab = min(out.logits.size(-1), t_logits.size(-1))
                kd = generalized_jsd(out.logits[..., :vocab], t_logits[..., :vocab], batch["labels"],
                                     distill.beta, distill.temperature)
                if distill.t2_scale:
                    kd = kd * distill.temperature**2
                loss = (1 - distill.alpha) * ce + distill.alpha * kd
                sums["kd"] += kd.item() / config.grad_accum
            if reference_kl is not None:
                with torch.no_grad():
                    r_logits = reference_kl.reference(batch["input_ids"], batch["attention_mask"])
                kl = generalized_jsd(out.logits, r_logits, batch["labels"], beta=1.0)  # KL(model || reference)
                loss = loss + reference_kl.beta * kl
                sums["kl"] += kl.item() / config.grad_accum
            (loss / config.grad_accum).backward()
            sums["loss"] += loss.item() / config.grad_accum
            sums["ce"] += ce.item() / config.grad_accum
            sums["tokens"] += int((batch["labels"][:, 1:] != IGNORE).sum())
        if world > 1:  # log the global figures, not rank 0's slice
            import torch.distributed as dist

            t = torch.tensor([sums["loss"], sums["ce"], sums["kd"], float(sums["tokens"]), sums["kl"]])
            dist.all_reduce(t)
            sums.update(loss=t[0].item() / world, ce=t[1].item() / world, kd=t[2].item() / world,
                        tokens=int(t[3].item()), kl=t[4].item() / world)  # every rank adapts beta alike
        if reference_kl is not None and reference_kl.max_kl is not None and sums["kl"] > reference_kl.max_kl:
            reference_kl.beta *= 2.0
            reference_kl.raised += 1
        return sums

    history: list[dict[str, Any]] = []
    log_file = Path(log_path).open("w", encoding="utf-8") if log_path and rank == 0 else None
    start = time.perf_counter()

    def validate(i: int) -> tuple[dict[str, Any], bool]:
        due = validator is not None and (i + 1 == steps or (config.eval_every and (i + 1) % config.eval_every == 0))
        if not due:
            return {}, False
        stop = validator.check(i + 1, model)
        return {f"eval/{k}": v for k, v in validator.checks[-1].figures.items()}, stop

    def on_step(i: int, figures: dict[str, Any]) -> bool:
        evaluated, stop = validate(i)
        if (i + 1) % config.log_every and i + 1 != steps and not evaluated:
            return stop
        row = {"step": i + 1, "loss": round(figures["loss"], 6), "ce": round(figures["ce"], 6), "lr": figures["lr"],
               "grad_norm": round(figures["grad_norm"], 6), "tokens": figures["tokens"],
               "elapsed_s": round(time.perf_counter() - start, 3), **evaluated}
        if teacher is not None:
            row["kd"] = round(figures["kd"], 6)
        if reference_kl is not None:
            row.update(kl=round(figures["kl"], 6), kl_beta=reference_kl.beta)
        history.append(row)
        if log_file:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        if on_log:
            on_log(row)
        return stop

    try:
        result = train_loop(model, optimizer, params, steps, step, lr_at=lambda i: lr_at(i, steps, config),
                            max_grad_norm=config.max_grad_norm, on_step=on_step, desc=progress_desc)
        if validator is not None:
            validator.restore_best(model)
    finally:
        if log_file:
            log_file.close()
        model.eval()
    extra: dict[str, Any] = validator.summary() if validator is not None else {}
    if validator is not None and result.steps < steps:
        extra["stopped_early_at"] = result.steps
    if mix:
        extra["mix_drawn"] = list(drawn)
        extra["mix_weights"] = [round(w / sum(weights), 6) for w in weights]
    return TrainResult(result.steps, len(data), result.losses[0], result.losses[-1], result.seconds, history, extra)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under any adapter wrapper takes transformers' `logits_to_keep`."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


PADDING_SLACK = 1.3  # padded tokens per real token a micro-batch may carry before it is split


def length_chunks(rows: list[Encoded]) -> list[list[Encoded]]:
    """The rows sorted by length and cut into micro-batches whose padded size stays within
    PADDING_SLACK of their real tokens (a 400-token code row no longer pads seven 60-token
    questions to 400)."""
    chunks: list[list[Encoded]] = []
    real = 0
    for e in sorted(rows, key=lambda e: len(e.input_ids)):
        n = len(e.input_ids)
        if chunks and (len(chunks[-1]) + 1) * n <= PADDING_SLACK * (real + n):
            chunks[-1].append(e)
            real += n
        else:
            chunks.append([e])
            real = n
    return chunks


def example_losses(model: Any, tokenizer: Any, data: list[Encoded], batch_size: int = 16) -> list[float]:
    """Each row's mean response-token cross-entropy under `model` (for --recover)."""
    import torch

    from orstack.train.losses import per_example_ce

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    losses: list[float] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            batch = collate(data[i:i + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            losses.extend(per_example_ce(logits, batch["labels"].to(device)).tolist())
    return losses


def hardest(data: list[Encoded], losses: list[float], fraction: float) -> list[int]:
    """Indices of the `fraction` of rows with the highest loss (at least one)."""
    k = max(1, round(len(data) * fraction))
    return sorted(range(len(data)), key=lambda i: -losses[i])[:k]
