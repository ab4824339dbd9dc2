"""`orstack route`: train a calibrated router on bench results, and run tasks through it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orstack.commands.options import ChatTemplate, Force, Output, RequiredOutput, current_runtime

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
        str, typer.Option("--embedder", help="Prompt embedding: tfidf, none, minilm or a model dir.")
    ] = "tfidf",
    cost: Annotated[
        str, typer.Option("--cost", help="A path's cost in the sweep: tokens (prompt + output) or latency (ms).")
    ] = "tokens",
    max_ece: Annotated[
        float | None, typer.Option("--max-ece", min=0.0, help=(
            "Gate: calibrated ECE on the test split at most this. Default: 0.05, or what a calibrated "
            "router shows on as many rows (95th percentile), whichever is larger."))
    ] = None,
    force: Force = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a reliability-diagram PNG.")] = None,
) -> None:
    """Learn P(base answer is correct) from bench results, calibrate it, choose a threshold.

    Features: the base model's mean/min log-probability, mean entropy and output length, the
    prompt's length, domain and embedding. Logistic regression and a small MLP (class-weighted)
    are compared by held-out log-loss; the winner is Platt-calibrated on a held-out split.
    The rows are split train / calibration / test (60/20/20, --seed); the threshold sweep, APGR
    and ECE are measured on the test split only, with 95% bootstrap intervals. Exit 3, writing
    nothing unless --force, when the calibrated test-split ECE is above --max-ece (default: 0.05, or,
    when larger, the ECE a perfectly calibrated router exceeds 5% of the time on as many test
    rows: ECE reads high on few rows, ~0.17 on 34 for a calibrated router).

    Example:

        orstack route train --results base.jsonl --results-accurate acc.jsonl --optimize --plot rel.png -o router
    """
    from orstack import console, route

    config = route.RouterConfig(embedder=embedder, threshold=threshold, optimize=optimize, cost_weight=cost_weight,
                                max_ece=0.05 if max_ece is None else max_ece, ece_chance=max_ece is None,
                                cost=cost, seed=current_runtime().seed, results=str(results),
                                results_accurate=str(results_accurate) if results_accurate is not None else None)
    result = route.train(output, config, current_runtime(), plot=plot, force=force)
    if result.sweep is not None:
        _print_sweep(result.sweep, result.router.threshold, result.router.metrics, config.cost)
    _print_calibration(result.router.metrics)
    console.info(f"router ({result.router.classifier.kind}, threshold {result.router.threshold:.2f}) "
                 f"written to {output}")


@route_app.command("run")
def run(
    tasks: Annotated[Path, typer.Argument(help="Task JSONL (`-` for stdin).")],
    base: Annotated[str, typer.Option("--base", help="The fast base model (checkpoint directory, or a .gguf file "
                                                    "run in llama.cpp).")],
    router: Annotated[
        Path | None, typer.Option("--router", help="Router directory from `route train` (needed for --mode auto).")
    ] = None,
    modifier: Annotated[
        list[str], typer.Option("--modifier", help="DOMAIN=ADAPTER: LoRA modifier for a domain. Repeatable.")
    ] = [],  # noqa: B006 - typer needs a literal default
    accurate: Annotated[
        str | None, typer.Option("--accurate", help="A separate accurate model for domains without a modifier.")
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="auto (router decides), fast or accurate.")] = "auto",
    vote: Annotated[int, typer.Option("--vote", help="Self-consistency: N samples on the accurate path.")] = 1,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also run the accurate path on every task, for always-accurate.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    output: Output = None,
    summary: Annotated[Path | None, typer.Option("--summary", help="Write the run summary as JSON.")] = None,
    chat_template: ChatTemplate = None,
) -> None:
    """Answer tasks with the base; escalate the ones the router doubts to a modifier or model.

    Output: Result rows plus `route` (mode, path, modifier, p_base_ok, threshold, decision_ms).

    Example:

        orstack route run --router router --base tiny --modifier arith=adapter tasks.jsonl -o routed.jsonl
    """
    from orstack import console, route
    from orstack.route.routing import parse_modifiers

    config = route.RouteRunConfig(base=base, router=str(router) if router is not None else None,
                            modifiers=parse_modifiers(modifier), accurate=accurate, mode=mode, vote=vote,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, compare=compare,
                            chat_template=chat_template, seed=current_runtime().seed)
    result = route.run(tasks, output, config, current_runtime(), summary=summary)
    _print_run_summary(result.summary)
    console.info(f"{result.rows} rows routed")


def _print_run_summary(stats: dict) -> None:
    from orstack import console

    tbl = console.new_table("route run", "value")
    tbl.add_row("accuracy", f"{stats['accuracy']:.3f}")
    tbl.add_row("accurate share", f"{stats['accurate_share']:.3f}")
    tbl.add_row("always-fast accuracy", f"{stats['always_fast_accuracy']:.3f}")
    if "always_accurate_accuracy" in stats:
        tbl.add_row("always-accurate accuracy", f"{stats['always_accurate_accuracy']:.3f}")
    for path, ms in stats["mean_latency_ms"].items():
        if ms is not None:
            tbl.add_row(f"mean latency {path} (ms/task)", f"{ms:.1f}")
    tbl.add_row("mean decision (ms)", f"{stats['mean_decision_ms']:.3f}")
    console.table(tbl)


def _print_calibration(metrics: dict) -> None:
    from orstack import console

    report = metrics["test_split"]
    tbl = console.new_table("test split", "before", "after",
                            title=f"calibration ({metrics['chosen']}, {metrics['rows']['test']} test rows)")
    for name in ("ece", "brier", "log_loss"):
        tbl.add_row(name, f"{report[name + '_before']:.4f}", f"{report[name + '_after']:.4f}")
    low, high = report.get("ece_after_ci95") or (None, None)
    if low is not None:
        tbl.add_row("  ece after, 95% CI", "", f"[{low:.4f}, {high:.4f}]")
    chance = report.get("ece_after_chance95")
    if chance is not None:
        tbl.add_row("  a calibrated router's, 95th pct.", "", f"{chance:.4f}")
    console.table(tbl)


def _print_sweep(sweep: list[dict], chosen: float, metrics: dict, cost: str) -> None:
    from orstack import console

    unit = "tokens" if cost == "tokens" else "ms"
    tbl = console.new_table("threshold", "accuracy", "accurate share", f"cost {unit}", "score",
                            title=f"threshold sweep (held-out split, {metrics.get('sweep_rows', '?')} rows)")
    for row in sweep:
        mark = " *" if abs(row["threshold"] - chosen) < 1e-9 else ""
        tbl.add_row(f"{row['threshold']:.2f}{mark}", f"{row['accuracy']:.3f}", f"{row['strong_share']:.3f}",
                    f"{row['cost']:.1f}", f"{row['score']:.4f}")
    console.table(tbl)
    routing = metrics.get("routing")
    if routing:
        acc_lo, acc_hi = routing["accuracy_ci95"]
        line = (f"at threshold {routing['threshold']:.2f}: accuracy {routing['accuracy']:.3f} "
                f"[95% CI {acc_lo:.3f}, {acc_hi:.3f}]")
        if routing.get("apgr") is not None:
            lo, hi = routing["apgr_ci95"]
            line += f"; APGR {routing['apgr']:.3f} [95% CI {lo:.3f}, {hi:.3f}] (random = 0.5)"
        console.info(line + f" on {routing['rows']} held-out rows")


def register(app: typer.Typer) -> None:
    app.add_typer(route_app, name="route")
