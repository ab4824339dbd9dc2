"""The one typed config of a training run (written into the output's manifest)."""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULERS = ("linear", "cosine", "constant")
SELECT_METRICS = ("accuracy", "loss")


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
    module_ranks: str | None = None  # "self_attn=64,mlp=32": LoRA rank per module group (others: lora_rank)
    merge: bool = False
    full: bool = False
    log: str | None = None
    log_every: int = 1
    max_length: int = 512
    warmup_steps: int = 0
    lr_scheduler: str = "linear"  # after warm-up: linear decay to 0, half-cosine to 0, or constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # validation and checkpoint selection (distill train; rl evaluates through trl's own loop)
    eval_data: tuple[str, ...] = field(default_factory=tuple)  # FILE[:WEIGHT]: tasks (accuracy) or rows (loss)
    eval_every: int = 0  # optimizer steps between validations; 0: only at the end
    early_stop: int = 0  # stop after this many validations without improvement; 0: never
    save_best: str | None = None  # keep the weights of the best validation by this metric
    mix: tuple[str, ...] = field(default_factory=tuple)  # FILE[:WEIGHT] drawn beside the main data
    rehearsal: float = 0.0  # fraction of each batch drawn from the --mix files (shorthand weights)

    def check(self) -> None:
        """Impossible combinations are bad input before anything loads."""
        from orstack.errors import BadInput

        if self.full and self.merge:
            raise BadInput("--merge applies to LoRA training; --full already trains every weight")
        if not self.max_steps and self.epochs <= 0:
            raise BadInput("--epochs must be > 0 (or give --max-steps)")
        if self.lr_scheduler not in SCHEDULERS:
            raise BadInput(f"--lr-scheduler {self.lr_scheduler}: expected one of {', '.join(SCHEDULERS)}")
        if self.save_best is not None and self.save_best not in SELECT_METRICS:
            raise BadInput(f"--save-best {self.save_best}: expected one of {', '.join(SELECT_METRICS)}")
        if (self.eval_every or self.early_stop or self.save_best) and not self.eval_data:
            flag = "--eval-every" if self.eval_every else "--early-stop" if self.early_stop else "--save-best"
            raise BadInput(f"{flag} needs --eval DATA (held-out tasks or rows to validate on)")
        if self.early_stop and not self.eval_every:
            raise BadInput("--early-stop counts validations: give --eval-every N as well")
        if not 0.0 <= self.rehearsal < 1.0:
            raise BadInput(f"--rehearsal {self.rehearsal}: expected a fraction in [0, 1)")
        if self.rehearsal and not self.mix:
            raise BadInput("--rehearsal FRACTION draws from the general data: give it with --mix FILE")
        self.mix_weights()
        if self.eval_data:
            from orstack.train.validate import parse_weighted

            parse_weighted(self.eval_data, "--eval")
        self.rank_pattern()

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def modules(self) -> str | list[str]:
        names = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def rank_pattern(self) -> dict[str, int]:
        """--module-ranks as peft's rank_pattern: each NAME=R gives every linear under a module
        called NAME (or the linear NAME itself) rank R; alpha keeps the run's alpha/rank ratio."""
        import re

        from orstack.errors import BadInput

        pattern: dict[str, int] = {}
        for part in (self.module_ranks or "").split(","):
            if not part.strip():
                continue
            name, _, rank = part.partition("=")
            if not name.strip() or not rank.strip().isdigit() or int(rank) < 1:
                raise BadInput(f"--module-ranks {self.module_ranks}: expected NAME=RANK[,NAME=RANK...] with "
                               f"whole ranks >= 1, got {part.strip()!r}")
            pattern[rf"{re.escape(name.strip())}(\..*)?"] = int(rank)
        return pattern

    def mix_weights(self) -> list[tuple[str, float]]:
        """--mix FILE[:WEIGHT] as (file, weight) pairs, each file present."""
        from orstack.train.validate import parse_weighted

        return parse_weighted(self.mix, "--mix")


def lr_multiplier(step: int, total: int, warmup: int, scheduler: str) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the peak: linear
    warm-up over `warmup` steps, then the scheduler's shape over the remaining steps."""
    import math

    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "constant":
        return 1.0
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def trl_scheduler(config: TrainConfig) -> str:
    """transformers' name for the same schedule (its `constant` ignores warm-up)."""
    if config.lr_scheduler == "constant":
        return "constant_with_warmup" if config.warmup_steps else "constant"
    return config.lr_scheduler
