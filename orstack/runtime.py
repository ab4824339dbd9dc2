"""The Runtime: where and how a run computes (device, threads, seed, pickle trust).

Only `orstack/cli.py` builds one from flags and environment; every stage takes it as an
argument, so the library never reads global settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from orstack.errors import BadInput

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> str:
    """A device name the user may give: auto, cpu, cuda or cuda:N (checked without importing torch)."""
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise BadInput(f"--device: expected auto, cpu, cuda or cuda:N, got '{name}'")
    return name


@dataclass(frozen=True)
class Runtime:
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    threads: int | None = None  # torch CPU threads (None: torch's default)
    seed: int = 0
    trust_pickle: bool = False
    rank: int = 0  # which process this is under torchrun / accelerate launch (their RANK)
    world_size: int = 1  # how many processes train together (their WORLD_SIZE)
    # Compression stages read the model layer by layer from its safetensors files where they can
    # (the same output, a fraction of the memory); False loads the whole model first.
    stream: bool = True

    @property
    def is_main_process(self) -> bool:
        """Rank 0, or not distributed: the process that logs and writes outputs."""
        return self.rank == 0

    def torch_device(self) -> str:
        """The device to compute on: `auto` is cuda when present; asking for cuda on a machine
        without it is bad input (one line, before any work)."""
        check_device_name(self.device)
        if self.device == "cpu":
            return "cpu"
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not torch.cuda.is_available():
            raise BadInput(f"--device {self.device}: no CUDA device is available (torch {torch.__version__} "
                           f"{'has no CUDA support' if torch.version.cuda is None else 'sees none'}); use --device cpu")
        index = int(self.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BadInput(f"--device {self.device}: only {torch.cuda.device_count()} CUDA device(s) present")
        return self.device

    def apply_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch; returns the seed."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed
