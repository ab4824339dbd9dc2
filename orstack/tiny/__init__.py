"""The embedded default model: a tiny Llama trained on verifiable synthetic tasks.

`build(TinyConfig(...), out, tasks_out)` writes the checkpoint and task files;
`orstack.tiny.tasks` holds the task generators, `orstack.tiny.tokenizer` the tokenizer,
`orstack.tiny.model` the model, its training and a quick greedy evaluation.
"""

from orstack.tiny.build import TASK_FILES, TinyResult, build, make_splits, write_tasks
from orstack.tiny.model import TinyConfig

__all__ = ["TASK_FILES", "TinyConfig", "TinyResult", "build", "make_splits", "write_tasks"]
