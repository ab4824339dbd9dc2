"""`distill train`: fine-tune a student on Training Examples (responses only), LoRA by default,
optionally with logit distillation from a same-vocabulary teacher, or in --recover mode on the
rows the model finds hardest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orstack.train.config import TrainConfig
from orstack.train.sft import DistillLoss, TrainResult


@dataclass
class DistillTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    logits_teacher: str | None = None
    distill: DistillLoss | None = None
    recover_fraction: float | None = None  # --recover: keep this fraction of the hardest rows


def fine_tune(student: str, rows: list[dict[str, Any]], config: DistillTrainConfig, *, device: str = "cpu",
              trust_pickle: bool = False, where: str = "data") -> tuple[Any, Any, TrainResult, dict[str, Any]]:
    """Load the student (and teacher), train, and return (model, tokenizer, result, metrics)."""
    from orstack.io.checkpoint import load_model
    from orstack.runtime import seed_everything
    from orstack.train.data import encode_rows
    from orstack.train.lora import apply_lora
    from orstack.train.sft import example_losses, hardest, train_sft
    from orstack.train.vocab import check_same_vocabulary

    tc = config.train
    if config.logits_teacher:
        check_same_vocabulary(student, config.logits_teacher)  # before any weights load
    seed_everything(tc.seed)
    model, tokenizer = load_model(student, device=device, trust_pickle=trust_pickle)
    data = encode_rows(tokenizer, rows, tc.max_length, where)
    metrics: dict[str, Any] = {"rows": len(data)}
    if config.recover_fraction is not None:
        losses = example_losses(model, tokenizer, data, tc.batch_size)
        keep = hardest(data, losses, config.recover_fraction)
        metrics.update(recover_rows=len(keep), recover_loss_all=sum(losses) / len(losses),
                       recover_loss_kept=sum(losses[i] for i in keep) / len(keep))
        data = [data[i] for i in keep]
    teacher = None
    if config.logits_teacher:
        teacher, _ = load_model(config.logits_teacher, device=device, trust_pickle=trust_pickle, with_tokenizer=False)
        for p in teacher.parameters():
            p.requires_grad_(False)
    if not tc.full:
        model = apply_lora(model, tc)
    result = train_sft(model, tokenizer, data, tc, teacher=teacher, distill=config.distill)
    metrics.update(steps=result.steps, trained_rows=len(data), loss_first=result.loss_first,
                   loss_last=result.loss_last, train_seconds=round(result.seconds, 2))
    return model, tokenizer, result, metrics
