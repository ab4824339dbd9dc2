"""`orstack route`: train a calibrated router on bench results, and run tasks through it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack.commands.options import RequiredOutput
from orstack.errors import BadInput

route_app = typer.Typer(
    help="""Calibrated confidence routing between a fast base and accurate modifiers.

`route train` learns P(base answer is correct) from bench Result rows; `route run` answers
tasks with the base and escalates the unconfident ones to a LoRA modifier or a bigger model.

Example:

    orstack route train --results base.jsonl --results-accurate acc.jsonl --optimize -o router
""",
    no_args_is_help=True,
)


@route_app.command("train")
def train(
    results: Annotated[Path, typer.Option("--results", help="bench Result rows of the base (fast) model.")],
    output: RequiredOutput,
    results_accurate: Annotated[
        Path | None, typer.Option("--results-accurate", help="bench Result rows of the accurate path, same tasks.")
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", min=0.0, max=1.0, help="Escalate when P(base ok) is below this.")
    ] = 0.8,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Pick the threshold in 0.70-0.90 by score (needs --results-accurate).")
    ] = False,
    cost_weight: Annotated[
        float, typer.Option("--cost-weight", min=0.0, help="score = accuracy - weight x cost / always-accurate cost.")
    ] = 0.2,
    embedder: Annotated[
        str, typer.Option("--embedder", help="Prompt embedding: tfidf, none, or a sentence-transformers model path.")
    ] = "tfidf",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a reliability-diagram PNG.")] = None,
) -> None:
    """Learn P(base answer is correct) from bench results, calibrate it, choose a threshold.

    Features: the base model's mean/min log-probability, mean entropy and output length, the
    prompt's length, domain and embedding. Logistic regression and a small MLP (class-weighted)
    are compared by held-out log-loss; the winner is Platt-calibrated on a held-out split.

    Example:

        orstack route train --results base.jsonl --results-accurate acc.jsonl --optimize --plot rel.png -o router
    """
    from orstack import console
    from orstack.io.atomic import atomic_path
    from orstack.io.jsonl import read_jsonl_list
    from orstack.io.manifest import build_manifest, write_manifest
    from orstack.route.features import check_signals
    from orstack.route.router import (
        RouterConfig,
        base_identity,
        join_accurate,
        optimise_threshold,
        train_router,
    )
    from orstack.runtime import settings

    if optimize and results_accurate is None:
        raise BadInput("--optimize needs --results-accurate (the accurate path's results on the same tasks)")
    rows = read_jsonl_list(results, required=("id", "correct"))
    check_signals(rows, str(results))
    accurate = None
    if results_accurate is not None:
        accurate = join_accurate(rows, read_jsonl_list(results_accurate, required=("id", "correct")),
                                 str(results_accurate))
    config = RouterConfig(embedder=embedder, threshold=threshold, optimize=optimize, cost_weight=cost_weight,
                          seed=settings.seed)
    router = train_router(rows, config)
    router.base = base_identity(rows, str(results))
    if accurate is not None:
        router.metrics["sweep"] = optimise_threshold(router, rows, accurate)
        _print_sweep(router.metrics["sweep"], router.threshold)
    _print_calibration(router.metrics)
    with atomic_path(output, directory=True) as tmp:
        router.save(tmp)
        args = {**config.__dict__, "results": str(results), "results_accurate": str(results_accurate or "")}
        write_manifest(tmp, build_manifest("route", args, parent=router.base.get("model"),
                                           metrics={**router.metrics, "threshold": router.threshold}))
    if plot is not None:
        _plot(router, rows, plot)
    console.info(f"router ({router.classifier.kind}, threshold {router.threshold:.2f}) written to {output}")


def _print_calibration(metrics: dict) -> None:
    from orstack import console

    tbl = console.new_table("test split", "before", "after", title=f"calibration ({metrics['chosen']})")
    report = metrics["test_split"]
    for name in ("ece", "brier", "log_loss"):
        tbl.add_row(name, f"{report[name + '_before']:.4f}", f"{report[name + '_after']:.4f}")
    console.table(tbl)


def _print_sweep(sweep: list[dict], chosen: float) -> None:
    from orstack import console

    tbl = console.new_table("threshold", "accuracy", "accurate share", "cost ms", "score", title="threshold sweep")
    for row in sweep:
        mark = " *" if abs(row["threshold"] - chosen) < 1e-9 else ""
        tbl.add_row(f"{row['threshold']:.2f}{mark}", f"{row['accuracy']:.3f}", f"{row['strong_share']:.3f}",
                    f"{row['cost']:.1f}", f"{row['score']:.4f}")
    console.table(tbl)


def _plot(router, rows: list[dict], path: Path) -> None:
    from orstack.route.calibration import plot_reliability
    from orstack.route.router import labels

    raw = router.classifier.predict(router.featurizer.transform(rows))
    plot_reliability(labels(rows), raw, router.platt(raw), path)


def register(app: typer.Typer) -> None:
    app.add_typer(route_app, name="route")
