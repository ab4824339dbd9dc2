"""Activation-aware weight quantization (int3/4/8, group-wise), stored packed.

`run(source, output, AWQConfig(...), runtime) -> AWQResult` is the whole stage.
"""

from orstack.awq.search import AWQConfig
from orstack.awq.stage import AWQResult, run

__all__ = ["AWQConfig", "AWQResult", "run"]
