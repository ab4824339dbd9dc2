"""merge: linear, SLERP, task-arithmetic, TIES and DARE merges of checkpoints and LoRA adapters,
streamed tensor by tensor, with an optional seeded evolutionary search over the recipe.

    from orstack.merge import MergeConfig, run
    run(["a", "b"], "merged", MergeConfig(method="slerp", t=[0.5]), Runtime())
"""

from typing import Any

from orstack.merge.config import METHODS, MergeConfig, Recipe

__all__ = ["METHODS", "MergeConfig", "MergeResult", "Recipe", "run"]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    # The stage is imported on first use, so that `orstack --help` does not pay for it.
    if name in ("run", "MergeResult"):
        from orstack.merge import stage

        return getattr(stage, name)
    raise AttributeError(name)
