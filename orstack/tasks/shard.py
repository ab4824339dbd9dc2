"""`--shard I/N`: one of N deterministic, contiguous parts of a run's work, for fan-out.

Shard I (0-based, as Slurm's and Ray's array indices and torchrun's ranks count) of N gets
the I-th contiguous block of the items in file order, the blocks as equal as they can be
(sizes differ by at most one). Contiguous blocks are what make the N outputs, concatenated in
shard order, the output of the unsharded run, byte for byte; every shard reads the whole
input, so a split never depends on anything but the input and N.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from orstack.errors import BadInput

T = TypeVar("T")
SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """(index, count) of "I/N" with 0 <= I < N; None for no sharding; BadInput otherwise."""
    if text is None:
        return None
    match = SHARD.match(str(text))
    if not match:
        raise BadInput(f"--shard {text}: expected I/N, e.g. 0/4 (shards count from 0)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise BadInput(f"--shard {text}: the index must be 0 to {max(count - 1, 0)} (shards count from 0)")
    return index, count


def shard_bounds(n_items: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of shard `index` of `count` over n_items."""
    return n_items * index // count, n_items * (index + 1) // count


def take_shard(items: Sequence[T], shard: str | None) -> list[T]:
    """The shard's contiguous block of `items` (all of them without a shard)."""
    parsed = parse_shard(shard)
    if parsed is None:
        return list(items)
    start, stop = shard_bounds(len(items), *parsed)
    return list(items[start:stop])
