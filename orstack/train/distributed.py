"""Runs under torchrun / accelerate launch: every process trains, only rank 0 logs and writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or not distributed: the process that logs and writes outputs."""
    return os.environ.get("RANK", "0") == "0"


def distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun / accelerate launch (WORLD_SIZE > 1) the process group is
    started here (gloo on CPU, nccl on GPU)."""
    world = world_size()
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def main_process_log(path: str | os.PathLike | None) -> Iterator[str | None]:
    """The file rank 0 writes the --log rows to: a temporary sibling of `path`, renamed into place
    when the block succeeds (removed when it fails). None on the other ranks, or without --log."""
    if path is None or not is_main_process():
        yield None
        return
    from orstack.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.touch()
        yield str(tmp)
