"""Options shared by many commands, defined once (sqlite-utils' habit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack.runtime import Runtime

Output = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="Output path (JSONL goes to standard output when omitted)."),
]
RequiredOutput = Annotated[Path, typer.Option("-o", "--output", help="Output path (written atomically).")]
Force = Annotated[bool, typer.Option("--force", help="Write the output even when a quality gate fails.")]
# Quality gates (orstack/gates.py; README "Gates"): measured against the parent on held-out data.
Eval = Annotated[
    Path | None,
    typer.Option("--eval", metavar="TASKS", help="Task JSONL to gate on: greedy accuracy of parent and output."),
]
MinRetention = Annotated[
    float, typer.Option("--min-retention", min=0.0, max=1.0,
                        help="Gate: keep at least this share of the parent's --eval accuracy (and, without "
                             "--max-ppl-rise, perplexity: ppl_parent / ppl_out).")]
MaxPplRise = Annotated[
    float | None, typer.Option("--max-ppl-rise", min=0.0,
                               help="Gate: largest --heldout perplexity rise over the parent, e.g. 0.03 = 3%.")]
MaxAccuracyDrop = Annotated[
    float, typer.Option("--max-accuracy-drop", min=0.0, metavar="PTS",
                        help="Gate: largest fall of --eval accuracy below the parent, in points.")]
MaxClusterDrop = Annotated[
    float, typer.Option("--max-cluster-drop", min=0.0, metavar="PTS",
                        help="Gate: largest fall of a targeted cluster's --eval accuracy, in points.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Read config and weight headers only, print the per-tensor plan "
                                         "(JSONL on standard output, a table on standard error) and exit.")]
Calib = Annotated[
    list[Path],
    typer.Option("--calib", help="Calibration text: .txt or .jsonl (field 'text', or prompt+response). Repeatable."),
]
NSamples = Annotated[int, typer.Option("--nsamples", min=1, help="Number of calibration sequences.")]
SeqLen = Annotated[int, typer.Option("--seqlen", min=8, help="Tokens per calibration sequence.")]
ChatTemplate = Annotated[
    str | None,
    typer.Option("--chat-template", metavar="model|FILE.jinja",
                 help="Prompt through a chat template: 'model' = the model's own, or a .jinja file. `messages` "
                      "tasks always use one (the model's by default); `prompt` tasks only with this option."),
]
Dtype = Annotated[str, typer.Option("--dtype", help="Load/compute dtype: float32, bfloat16 or float16.")]


def current_runtime() -> Runtime:
    """The Runtime the global options built (orstack/cli.py), for the command being run."""
    try:  # typer >= 0.20 vendors click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context

    ctx = get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Runtime) else Runtime()
