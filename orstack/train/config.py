"""The one typed config of a training run (written into the output's manifest)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: 2 x rank
    target_modules: str = "all-linear"
    merge: bool = False
    full: bool = False
    log: str | None = None
    log_every: int = 1
    max_length: int = 512
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Impossible combinations are bad input before anything loads."""
        from orstack.errors import BadInput

        if self.full and self.merge:
            raise BadInput("--merge applies to LoRA training; --full already trains every weight")
        if not self.max_steps and self.epochs <= 0:
            raise BadInput("--epochs must be > 0 (or give --max-steps)")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def modules(self) -> str | list[str]:
        names = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return "all-linear" if names == ["all-linear"] else names
