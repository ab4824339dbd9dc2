"""Supervised fine-tuning on responses, optionally with logit distillation: one plain loop.

AdamW over the trainable parameters (the LoRA matrices, or everything with --full), linear
warm-up then linear decay, gradient clipping, gradient accumulation, rows shuffled by the
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
from typing import Any

from orstack.errors import BadInput
from orstack.train.config import TrainConfig
from orstack.train.data import Encoded, collate


@dataclass
class DistillLoss:
    """Logit distillation as trl's GKD defines it (beta 0: forward KL, 1: reverse KL)."""

    beta: float = 0.0
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the distillation term; (1 - alpha) weighs the cross-entropy
    t2_scale: bool = False  # multiply the distillation term by temperature^2 (Hinton et al.)


@dataclass
class TrainResult:
    steps: int
    examples: int
    loss_first: float | None
    loss_last: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


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


def distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun / accelerate launch (WORLD_SIZE > 1) the process group is
    started here (gloo on CPU, nccl on GPU)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0, or not distributed: the process that logs and writes outputs."""
    import os

    return os.environ.get("RANK", "0") == "0"


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total - config.warmup_steps)
    return config.lr * max(0.0, 1.0 - (step - config.warmup_steps) / span)


def train_sft(model: Any, tokenizer: Any, data: list[Encoded], config: TrainConfig, *,
              teacher: Any = None, distill: DistillLoss | None = None,
              on_log: Callable[[dict[str, Any]], None] | None = None, progress_desc: str = "training") -> TrainResult:
    """Train `model` in place on encoded rows; returns the loss trajectory."""
    import torch

    from orstack.console import progress
    from orstack.train.losses import generalized_jsd, masked_ce

    if not data:
        raise BadInput("no training rows")
    rank, world = distributed()
    if rank != 0:
        from orstack.console import set_quiet

        set_quiet(True)
    # Each optimizer step consumes batch_size x grad_accum x world rows; every process draws the
    # same global batches (same seed) and takes its own slice, and DDP averages the gradients.
    steps = total_steps(len(data), config) if config.max_steps else max(1, math.ceil(
        total_steps(len(data), config) / world))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadInput("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    stream = batches(data, config.batch_size * world, config.seed)
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model)
    log_file = Path(config.log).open("w", encoding="utf-8") if config.log and rank == 0 else None
    history: list[dict[str, Any]] = []
    model.train()
    start = time.perf_counter()
    first = last = None
    try:
        with progress() as bar:
            task = bar.add_task(progress_desc, total=steps, unit="steps")
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, steps, config)
                sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "tokens": 0}
                for _ in range(config.grad_accum):
                    rows = next(stream)[rank::world] or [Encoded([pad_id], [-100], 0.0)]
                    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
                    out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    ce = masked_ce(out.logits, batch["labels"], batch["weights"])
                    loss = ce
                    if teacher is not None and distill is not None:
                        with torch.no_grad():
                            t_logits = teacher(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits
                        vocab = min(out.logits.size(-1), t_logits.size(-1))
                        kd = generalized_jsd(out.logits[..., :vocab], t_logits[..., :vocab], batch["labels"],
                                             distill.beta, distill.temperature)
                        if distill.t2_scale:
                            kd = kd * distill.temperature**2
                        loss = (1 - distill.alpha) * ce + distill.alpha * kd
                        sums["kd"] += kd.item() / config.grad_accum
                    (loss / config.grad_accum).backward()
                    sums["loss"] += loss.item() / config.grad_accum
                    sums["ce"] += ce.item() / config.grad_accum
                    sums["tokens"] += int((batch["labels"][:, 1:] != -100).sum())
                if world > 1:  # log the global figures, not rank 0's slice
                    import torch.distributed as dist

                    t = torch.tensor([sums["loss"], sums["ce"], sums["kd"], float(sums["tokens"])])
                    dist.all_reduce(t)
                    sums.update(loss=t[0].item() / world, ce=t[1].item() / world, kd=t[2].item() / world,
                                tokens=int(t[3].item()))
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                first = sums["loss"] if first is None else first
                last = sums["loss"]
                bar.update(task, advance=1, description=f"{progress_desc} loss {last:.4f}")
                if (step + 1) % config.log_every == 0 or step + 1 == steps:
                    row = {"step": step + 1, "loss": round(sums["loss"], 6), "ce": round(sums["ce"], 6),
                           "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(float(grad_norm), 6),
                           "tokens": sums["tokens"], "elapsed_s": round(time.perf_counter() - start, 3)}
                    if teacher is not None:
                        row["kd"] = round(sums["kd"], 6)
                    history.append(row)
                    if log_file:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                    if on_log:
                        on_log(row)
    finally:
        if log_file:
            log_file.close()
        model.eval()
    return TrainResult(steps, len(data), first, last, time.perf_counter() - start, history)


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
