"""`orstack merge`: combine checkpoints or LoRA adapters (linear, SLERP, task arithmetic, TIES, DARE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack import console
from orstack.commands.options import Force, RequiredOutput, current_runtime
from orstack.merge.config import METHODS, MergeConfig

HELP = """Merge checkpoints of one architecture, or LoRA adapters of one base, into one model.

Methods: linear (weighted mean; --weights, normalised), slerp (two models, along the great
circle; --t, one factor or several spread over the decoder layers), task-arithmetic
(base + lambda x sum w_i (model_i - base)), ties (task vectors trimmed to their --density
largest entries, a sign elected per entry, agreeing entries averaged), dare-linear and
dare-ties (entries dropped with probability 1 - density, the rest scaled by 1/density,
seeded by --seed; then summed, or sign-elected as TIES). Task vectors are taken against
--base. Adapters are merged as one adapter (linear and task-arithmetic exactly, by
stacking the factors; the others dense, then cut to --rank by SVD), or folded into their
base with --fold; an adapter among checkpoints is folded into its base. The output streams
tensor by tensor from the inputs' safetensors files (about one tensor per input in memory).
Inputs with other architectures, shapes, vocabularies or tokenizers, and adapters of other
bases, are refused before any weight is read. The manifest records the recipe and every
parent.

With --tasks (bench's verifiers) or --heldout (perplexity) each input and the merge are
scored; the merge must beat the best single input, else exit 3 and nothing is written
(unless --force). --evolve searches the weights, densities, lambda or per-layer SLERP
factors with a seeded evolution strategy (--generations x --population candidates, a row
each in --log) and writes the best recipe.

Example:

\b
    orstack merge arith string -o merged --method ties --base tiny --density 0.5
    orstack merge arith string -o evolved --method dare-ties --base tiny \\
        --evolve --tasks search.jsonl --generations 3 --population 6 --log evolve.jsonl
"""


def _floats(values: list[str] | None, option: str) -> list[float] | None:
    """Numbers given repeatedly or comma-separated (`--weights 0.7,0.3` or `--weights 0.7 --weights 0.3`)."""
    from orstack.errors import BadInput

    if not values:
        return None
    out = []
    for value in values:
        for part in value.split(","):
            try:
                out.append(float(part))
            except ValueError:
                raise BadInput(f"{option}: '{part}' is not a number") from None
    return out


def merge(
    models: Annotated[
        list[str], typer.Argument(metavar="MODEL...", help="Checkpoint or LoRA adapter directories (two or more).")
    ],
    output: RequiredOutput,
    method: Annotated[str, typer.Option("--method", help=", ".join(METHODS) + ".")] = MergeConfig.method,
    weights: Annotated[
        list[str] | None, typer.Option("--weights", help="One weight per model (comma-separated or repeated).")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="The model task vectors are taken against (task-arithmetic, ties, "
                                                "dare-*; adapters: their base by default).")
    ] = None,
    density: Annotated[
        list[str] | None, typer.Option("--density", help="ties/dare: share of each task vector kept (one, or one "
                                                         "per model; default 0.5).")
    ] = None,
    lam: Annotated[
        float, typer.Option("--lambda", help="Scale of the merged task vector (task-vector methods).")
    ] = MergeConfig.lam,
    t: Annotated[
        list[str] | None, typer.Option("--t", help="slerp factor(s) in [0, 1]: one, or several spread over the "
                                                   "decoder layers (default 0.5).")
    ] = None,
    fold: Annotated[
        bool, typer.Option("--fold", help="Adapters: fold the merge into the base (a checkpoint).")
    ] = False,
    rank: Annotated[
        int | None, typer.Option("--rank", min=1, help="Adapter output rank of slerp/ties/dare merges (default: "
                                                       "sum of the inputs' ranks).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Output dtype: float32, float16 or bfloat16 (default: the inputs').")
    ] = None,
    tasks: Annotated[
        Path | None, typer.Option("--tasks", help="Fitness: bench's verifiers on these tasks (accuracy).")
    ] = None,
    heldout: Annotated[
        list[Path] | None, typer.Option("--heldout", help="Fitness: perplexity on this text (.txt/.jsonl). "
                                                          "Repeatable.")
    ] = None,
    evolve: Annotated[bool, typer.Option("--evolve", help="Search the recipe on the fitness.")] = False,
    generations: Annotated[
        int, typer.Option("--generations", min=1, help="--evolve: generations.")
    ] = MergeConfig.generations,
    population: Annotated[
        int, typer.Option("--population", min=2, help="--evolve: candidates per generation.")
    ] = MergeConfig.population,
    log: Annotated[Path | None, typer.Option("--log", help="--evolve: a JSONL row per candidate.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="--tasks: generation budget per task.")
    ] = MergeConfig.max_new_tokens,
    force: Force = False,
) -> None:
    runtime = current_runtime()
    config = MergeConfig(method=method, weights=_floats(weights, "--weights"), base=base,
                         density=_floats(density, "--density"), lam=lam, t=_floats(t, "--t") or [0.5], fold=fold,
                         rank=rank, dtype=dtype, seed=runtime.seed, evolve=evolve,
                         tasks=str(tasks) if tasks else None, heldout=[str(h) for h in heldout] if heldout else None,
                         generations=generations, population=population, max_new_tokens=max_new_tokens,
                         log=str(log) if log else None, force=force)
    from orstack.merge import run

    result = run(models, output, config, runtime, report=_report)
    recipe = ", ".join(f"{k} {v}" for k, v in result.recipe.items() if k != "method")
    console.info(f"{result.recipe['method']} merge of {len(models)} models ({recipe}) -> {result.kind} {output} "
                 f"in {result.metrics['seconds']:.1f} s")


def _report(scores: dict[str, float]) -> None:
    tbl = console.new_table("model", "fitness", title="merge")
    for name, value in scores.items():
        tbl.add_row(name, f"{value:.4f}")
    console.table(tbl)


def register(app: typer.Typer) -> None:
    app.command("merge", help=HELP)(merge)
