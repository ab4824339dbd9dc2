"""Calibrated confidence routing: answer with the fast base when it is confidently right,
switch to base + a domain modifier (LoRA) or a bigger model when it is not.

`train(output, RouterConfig(...), runtime)` and `run(tasks, output, RouteRunConfig(...),
runtime)` (orstack/route/stage.py) are the two commands; router.py, features.py and
calibration.py make the router, routing.py answers through it, sweep.py measures it.
"""

from orstack.route.router import RouterConfig
from orstack.route.routing import RouteRunConfig
from orstack.route.stage import RouteRunResult, RouteTrainResult, run, train

__all__ = ["RouteRunConfig", "RouteRunResult", "RouteTrainResult", "RouterConfig", "run", "train"]
