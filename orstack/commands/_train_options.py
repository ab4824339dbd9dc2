"""Training options shared by `distill train` and `rl`, defined once.

The values land in `orstack.train.config.TrainConfig` (written into the manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Epochs = Annotated[float, typer.Option("--epochs", min=0.0, help="Passes over the data (ignored with --max-steps).")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", min=1, help="Optimizer steps (overrides --epochs).")]
LearningRate = Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW, linear decay).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help="Forward passes per optimizer step.")]
LoraRank = Annotated[int, typer.Option("--lora-rank", min=1, help="LoRA rank r.")]
LoraAlpha = Annotated[float | None, typer.Option("--lora-alpha", min=0.0, help="LoRA alpha (default: 2 x rank).")]
TargetModules = Annotated[
    str, typer.Option("--target-modules", help="Comma-separated module names LoRA adapts ('all-linear' for every "
                      "linear layer but lm_head).")
]
Merge = Annotated[bool, typer.Option("--merge", help="Fold the adapter into the weights and save a full checkpoint.")]
Full = Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")]
Log = Annotated[
    Path | None,
    typer.Option("--log", envvar="ORSTACK_LOG", help="Write one JSONL row per logging step to this file "
                 "(or set ORSTACK_LOG: torchrun's own parser claims --log).")
]
LogEvery = Annotated[int, typer.Option("--log-every", min=1, help="Optimizer steps between log rows.")]
Warmup = Annotated[int, typer.Option("--warmup", min=0, help="Optimizer steps of linear learning-rate warm-up.")]
LrScheduler = Annotated[
    str, typer.Option("--lr-scheduler", help="After warm-up: linear (decay to 0), cosine (half-cosine to 0) or "
                      "constant.")
]
WeightDecay = Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")]
MaxGradNorm = Annotated[float, typer.Option("--max-grad-norm", min=0.0, help="Clip the gradient norm to this.")]
ModuleRanks = Annotated[
    str | None, typer.Option("--module-ranks", help="Per-module LoRA ranks, NAME=RANK[,NAME=RANK...] (e.g. "
                             "self_attn=64,mlp=32; other targets keep --lora-rank).")
]
Eval = Annotated[
    list[str], typer.Option("--eval", help="Held-out FILE[:WEIGHT] to validate on (repeatable): tasks "
                            "(accuracy) or training rows (loss); several files score as their weighted mean.")
]
EvalEvery = Annotated[int, typer.Option("--eval-every", min=0, help="Optimizer steps between validations "
                                        "(0: only at the end).")]
EarlyStop = Annotated[int, typer.Option("--early-stop", min=0, help="Stop after this many validations without "
                                        "improvement (0: never).")]
SaveBest = Annotated[
    str | None, typer.Option("--save-best", help="Keep the weights of the best validation by this metric: "
                             "accuracy or loss.")
]
Mix = Annotated[
    list[str], typer.Option("--mix", help="FILE[:WEIGHT] drawn beside the main data (repeatable; the main data "
                            "weighs 1), reproducible by --seed.")
]
Rehearsal = Annotated[float, typer.Option("--rehearsal", min=0.0, max=0.99, help="Fraction of the draws taken "
                                          "from the --mix files (e.g. 0.1: a tenth from the general data).")]


def recipe(warmup_steps: int, lr_scheduler: str, weight_decay: float, max_grad_norm: float, module_ranks: str | None,
           eval_data: list[str], eval_every: int, early_stop: int, save_best: str | None, mix: list[str],
           rehearsal: float) -> dict:
    """The shared recipe options as TrainConfig fields (one mapping for every training command)."""
    return {"warmup_steps": warmup_steps, "lr_scheduler": lr_scheduler, "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm, "module_ranks": module_ranks, "eval_data": tuple(eval_data),
            "eval_every": eval_every, "early_stop": early_stop, "save_best": save_best, "mix": tuple(mix),
            "rehearsal": rehearsal}
