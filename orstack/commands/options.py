"""Options shared by many commands, defined once (sqlite-utils' habit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Output = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="Output path (JSONL goes to standard output when omitted)."),
]
RequiredOutput = Annotated[Path, typer.Option("-o", "--output", help="Output path (written atomically).")]
Force = Annotated[bool, typer.Option("--force", help="Write the output even when a quality gate fails.")]
Calib = Annotated[
    list[Path],
    typer.Option("--calib", help="Calibration text: .txt or .jsonl (field 'text', or prompt+response). Repeatable."),
]
NSamples = Annotated[int, typer.Option("--nsamples", min=1, help="Number of calibration sequences.")]
SeqLen = Annotated[int, typer.Option("--seqlen", min=8, help="Tokens per calibration sequence.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Load/compute dtype: float32, bfloat16 or float16.")]
