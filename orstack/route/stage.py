"""`orstack route` as two calls: `train` (bench results -> a router directory) and `run`
(tasks -> routed Result rows). Each checks its inputs and outputs first, then works and saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.route.router import Router, RouterConfig
from orstack.route.routing import RouteRunConfig

if TYPE_CHECKING:
    from orstack.gates import Verdict
    from orstack.runtime import Runtime


@dataclass
class RouteTrainResult:
    router: Router
    output: Path
    sweep: list[dict] | None  # threshold sweep rows (held-out split) when accurate-path results were given
    plot: Path | None = None
    verdict: Verdict | None = None  # the ECE gate (None: --max-ece off)


@dataclass
class RouteRunResult:
    summary: dict[str, Any]  # accuracy, accurate share, latencies (orstack.route.routing.summarise)
    rows: int
    output: str | None  # None: standard output
    summary_path: str | None = None
    paths: dict[str, int] = field(default_factory=dict)  # route path -> rows


def train(output: str | Path, config: RouterConfig, runtime: Runtime, *, plot: str | Path | None = None,
          force: bool = False) -> RouteTrainResult:
    """Learn P(base answer is correct) from `config.results`, calibrate it, choose the threshold
    (swept over the held-out split of `config.results_accurate` when given) and write the router
    directory `output`. The ECE gate (`config.max_ece`, on the calibrated test split) raises
    GateTripped, writing nothing, unless `force`; a forced router's manifest says so."""
    from orstack.gates import check_limits
    from orstack.io.atomic import atomic_path
    from orstack.io.jsonl import check_input_file
    from orstack.io.manifest import build_manifest, write_manifest
    from orstack.io.output import Output, check_outputs
    from orstack.route.features import load_results
    from orstack.route.router import COSTS, MIN_ROWS, base_identity, join_accurate, optimise_threshold, train_router

    if config.results is None:
        raise BadInput("route train needs --results (bench Result rows of the base model)")
    inputs = [config.results, config.results_accurate]
    check_outputs([Output(output, "dir"), Output(plot, "file", "--plot")], inputs)
    check_input_file(config.results, "--results")
    if config.results_accurate is not None:
        check_input_file(config.results_accurate, "--results-accurate")
    check_limits(max_ece=config.max_ece)
    if config.cost not in COSTS:
        raise BadInput(f"--cost: expected {' or '.join(COSTS)}, got '{config.cost}'")
    if config.optimize and config.results_accurate is None:
        raise BadInput("--optimize needs --results-accurate (the accurate path's results on the same tasks)")
    if config.embedder not in ("tfidf", "none"):
        from orstack.cluster_failures.embed import resolve_embedder

        resolve_embedder(config.embedder)
    rows = load_results(config.results)
    if len(rows) < MIN_ROWS:
        raise BadInput(f"{config.results}: route train needs at least {MIN_ROWS} result rows, got {len(rows)}")
    accurate = None
    if config.results_accurate is not None:
        accurate = join_accurate(rows, load_results(config.results_accurate, signals=False),
                                 str(config.results_accurate))
    base = base_identity(rows, str(config.results))

    router = train_router(rows, config)
    router.base = base
    sweep = None
    if accurate is not None:
        sweep = router.metrics["sweep"] = optimise_threshold(router, rows, accurate)
    verdict = ece_gate(router, force)
    with atomic_path(output, directory=True) as tmp:
        router.save(tmp)
        extra = {"gate": verdict.record()} if verdict is not None else None
        write_manifest(tmp, build_manifest("route", config, parent=router.base.get("model"),
                                           metrics={**router.metrics, "threshold": router.threshold}, extra=extra))
    if plot is not None:
        from orstack.route.calibration import plot_reliability
        from orstack.route.router import labels

        raw = router.classifier.predict(router.featurizer.transform(rows))
        plot_reliability(labels(rows), raw, router.platt(raw), plot)
    return RouteTrainResult(router, Path(output), sweep, Path(plot) if plot is not None else None, verdict)


def ece_gate(router: Router, force: bool) -> Verdict | None:
    """The calibrated router's ECE on the test split (rows it was neither fitted nor calibrated
    on) against --max-ece, or, when that is below it, against the ECE a perfectly calibrated
    router exceeds 5% of the time on as many rows (`ece_chance`: the default, not an explicit
    --max-ece); GateTripped unless it passes or `force`."""
    if router.config.max_ece is None:
        return None
    from orstack.gates import Gate, decide

    report = router.metrics["test_split"]
    rows = router.metrics["rows"]["test"]
    on = f"test split, {rows} rows, {report['bins']} bins"
    limit, option = router.config.max_ece, "--max-ece"
    chance = report.get("ece_after_chance95")
    if router.config.ece_chance and chance is not None and chance > limit:
        limit = chance
        option = f"--max-ece {router.config.max_ece:g} or a calibrated router's 95th percentile on {rows} rows"
    check = Gate("ece", limit, "max", option).check(report["ece_after"], on=on)
    return decide("route train", [check], force)


def run(tasks: str | Path, output: str | Path | None, config: RouteRunConfig, runtime: Runtime, *,
        summary: str | Path | None = None) -> RouteRunResult:
    """Answer `tasks` with the base, escalate what the router doubts; write the Result rows (with
    `route`) to `output` (standard output when None) and the run summary to `summary`."""
    from collections import Counter

    from orstack.io.checkpoint import resolve_checkpoint
    from orstack.io.jsonl import write_json, write_jsonl
    from orstack.io.output import Output, check_outputs
    from orstack.route.routing import check_plan, route_tasks
    from orstack.tasks.contract import load_tasks

    check_outputs([Output(output, "file", "-o"), Output(summary, "file", "--summary")], [tasks])
    rows = load_tasks(tasks)
    router = Router.load(config.router) if config.router is not None else None
    check_plan(config, router, rows)
    resolve_checkpoint(config.base)
    if config.accurate is not None:
        resolve_checkpoint(config.accurate)
    runtime.torch_device()  # --device cuda without CUDA: refused before any model loads

    routed, stats = route_tasks(config, router, rows, runtime)
    write_jsonl(routed, output)
    if summary is not None:
        write_json(stats, summary)
    paths = Counter(r["route"]["path"] for r in routed)
    return RouteRunResult(stats, len(routed), None if output is None else str(output),
                          None if summary is None else str(summary), dict(paths))
