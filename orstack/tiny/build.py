"""Build the tiny default end to end: tasks, tokenizer, model, checkpoint and task files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.io.atomic import write_text_atomic
from orstack.io.jsonl import write_jsonl
from orstack.tiny.model import TinyConfig, run
from orstack.tiny.tasks import as_text, make_heldout, make_train_rows

if TYPE_CHECKING:
    from orstack.runtime import Runtime

TASK_FILES = ("train.jsonl", "heldout.jsonl", "corpus.txt", "heldout.txt")


@dataclass
class TaskSplits:
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]


def make_splits(config: TinyConfig) -> TaskSplits:
    """The held-out rows and a sample of training rows (disjoint from them), from the seed."""
    heldout = make_heldout(config.n_heldout, config.seed)
    train = make_train_rows(config.n_train_rows, config.seed, {r["prompt"] for r in heldout})
    return TaskSplits(train=train, heldout=heldout)


def write_tasks(splits: TaskSplits, directory: Path) -> None:
    """train.jsonl, heldout.jsonl (Task contract), corpus.txt (training-distribution text for
    calibration and perplexity) and heldout.txt (held-out text for perplexity); each atomic."""
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(splits.train, directory / "train.jsonl")
    write_jsonl(splits.heldout, directory / "heldout.jsonl")
    write_text_atomic(directory / "corpus.txt", as_text(splits.train))
    write_text_atomic(directory / "heldout.txt", as_text(splits.heldout))


@dataclass
class TinyResult:
    """What `orstack tiny` reports: the checkpoint written and its metrics (held-out accuracy...)."""

    output: Path
    tasks_out: Path | None
    metrics: dict[str, Any]


def build(config: TinyConfig, out: Path, tasks_out: Path | None = None, runtime: Runtime | None = None) -> TinyResult:
    """Write the tiny checkpoint to `out` (and the task files to `tasks_out`), computing on
    `runtime`'s device (None: the CPU, where the same seed and steps give the same bytes).

    Both outputs and the device are checked before any work: `out` must be a checkpoint
    directory orstack may replace, `tasks_out` a directory (its four task files are replaced,
    other files kept)."""
    from orstack.io.checkpoint import save_checkpoint
    from orstack.io.output import Output, check_outputs
    from orstack.tiny.tokenizer import build_tokenizer

    check_outputs([Output(out, "dir", "-o"), Output(tasks_out, "dir", "--tasks-out", replace="any")])
    device = runtime.torch_device() if runtime is not None else "cpu"
    splits = make_splits(config)
    tokenizer = build_tokenizer()
    model, metrics = run(config, tokenizer, splits.heldout, device)
    # Task files first: if saving the checkpoint fails, the run is reported as failed either way,
    # and a checkpoint never exists without the tasks it was evaluated on.
    if tasks_out is not None:
        write_tasks(splits, tasks_out)
    save_checkpoint(model, tokenizer, out, stage="tiny", args=config, metrics=metrics)
    return TinyResult(Path(out), Path(tasks_out) if tasks_out is not None else None, metrics)
