"""Run-wide settings from the global options (--seed, --device, --trust-pickle)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    seed: int = 0
    device: str = "auto"
    trust_pickle: bool = False


settings = Settings()


def seed_everything(seed: int | None = None) -> int:
    """Seed python, numpy and torch; returns the seed used."""
    import random

    import numpy as np
    import torch

    seed = settings.seed if seed is None else seed
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed


def device() -> str:
    """The torch device to use: --device, with `auto` meaning cuda when present."""
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
