"""Runs under torchrun / accelerate launch: every process trains, only rank 0 logs and writes.

Which process this is comes from the Runtime (`rank`, `world_size`: cli.py reads the
launcher's RANK and WORLD_SIZE).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orstack.runtime import Runtime


def init_distributed(runtime: Runtime) -> None:
    """Start torch's process group when this is one process of several (gloo on CPU, nccl on GPU)."""
    if runtime.world_size <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


@contextmanager
def main_process_log(path: str | os.PathLike | None, runtime: Runtime) -> Iterator[str | None]:
    """The file rank 0 writes the --log rows to: a temporary sibling of `path`, renamed into place
    when the block succeeds (removed when it fails). None on the other ranks, or without --log."""
    if path is None or not runtime.is_main_process:
        yield None
        return
    from orstack.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.touch()
        yield str(tmp)
