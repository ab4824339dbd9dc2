"""`orstack tiny`: build the embedded default model (and its task files)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import RequiredOutput, current_runtime

HELP = """Build the embedded default: a tiny Llama trained on synthetic, verifiable tasks.

Writes a Hugging Face checkpoint (byte-level BPE tokenizer, 2-layer Llama of hidden 256,
1.45M parameters) trained for a fixed number of steps on seven task families
(add, sub, mul, reverse, sort, copy, compare) at four difficulty levels each. It is good
on the easy levels and fails on the hard ones, so failures cluster by family and level.
The same --seed, --steps and --threads give bit-identical weights (on the CPU).

--tasks-out DIR writes DIR/train.jsonl and DIR/heldout.jsonl (Task rows with family and
level; held-out prompts never appear in training), DIR/corpus.txt (training-distribution
text for calibration/perplexity) and DIR/heldout.txt (held-out text for perplexity).

Example:

    orstack --seed 0 tiny -o tiny --tasks-out tasks
"""


def tiny(
    output: RequiredOutput,
    tasks_out: Annotated[
        Path | None, typer.Option("--tasks-out", help="Also write train/held-out task files and text corpora here.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps (batch 64 each).")] = 1000,
    untrained: Annotated[
        bool, typer.Option("--untrained", help="Write a randomly initialised model (fast; for testing mechanics).")
    ] = False,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="CPU threads for training; part of what makes weights reproducible.")
    ] = 1,
) -> None:
    from orstack.tiny import TinyConfig, build

    config = TinyConfig(seed=current_runtime().seed, steps=steps, untrained=untrained, threads=threads)
    result = build(config, output, tasks_out, current_runtime())
    if untrained:
        console.info(f"wrote an untrained tiny model to {output}")
        return
    metrics = result.metrics
    console.info(f"wrote {output}: final loss {metrics['final_loss']}, held-out accuracy "
                 f"{metrics['heldout_accuracy']:.1%} in {metrics['train_seconds']:.0f} s of training")
    tbl = console.new_table("family", "L1", "L2", "L3", "L4", "all", title="held-out accuracy (greedy, exact)")
    by_level = metrics["accuracy_by_level"]
    for family, acc in metrics["accuracy_by_family"].items():
        tbl.add_row(family, *(f"{by_level.get(f'{family}-{lv}', 0):.0%}" for lv in (1, 2, 3, 4)), f"{acc:.0%}")
    console.table(tbl)


def register(app: typer.Typer) -> None:
    app.command("tiny", help=HELP)(tiny)
