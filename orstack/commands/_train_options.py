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
