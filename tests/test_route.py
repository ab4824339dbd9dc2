"""route: calibration, the router's fit/save/load, routing metrics, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from orstack.route.calibration import Platt, ece, log_loss
from orstack.route.router import Router, RouterConfig, train_router
from orstack.route.sweep import Outcome, apgr, cpt


def synthetic_results(n: int = 400, seed: int = 0) -> list[dict]:
    """Result rows whose correctness depends on the model's confidence signals and domain."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        domain = ["math", "string"][i % 2]
        skill = rng.normal() + (1.0 if domain == "string" else -0.5)
        correct = bool(rng.random() < 1 / (1 + math.exp(-2.5 * skill)))
        rows.append({"id": f"t{i}", "model": "base", "prompt": f"{domain} {i}", "domain": domain,
                     "correct": correct, "mean_logprob": -1.0 + 0.4 * skill + 0.1 * rng.normal(),
                     "min_logprob": -3.0 + 0.8 * skill + 0.2 * rng.normal(), "mean_entropy": 1.0 - 0.3 * skill,
                     "output_tokens": int(rng.integers(1, 8)), "prompt_tokens": 5, "latency_ms": 10.0})
    return rows


def test_platt_fixes_an_overconfident_model_and_never_raises_log_loss():
    rng = np.random.default_rng(1)
    z = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(float)
    overconfident = 1 / (1 + np.exp(-(3 * z + 1)))
    platt = Platt.fit(y, overconfident)
    assert ece(y, platt(overconfident), 15) < 0.03 < ece(y, overconfident, 15)
    assert log_loss(y, platt(overconfident)) <= log_loss(y, overconfident)
    calibrated = 1 / (1 + np.exp(-z))
    assert log_loss(y, Platt.fit(y, calibrated)(calibrated)) <= log_loss(y, calibrated) + 1e-12


def test_router_learns_saves_and_reloads(tmp_path):
    rows = synthetic_results()
    router = train_router(rows, RouterConfig(seed=0))
    p = router.predict(rows)
    y = np.array([r["correct"] for r in rows], dtype=float)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, p) > 0.8
    report = router.metrics["test_split"]
    assert report["log_loss_after"] <= report["log_loss_before"] + 0.05
    out = tmp_path / "router"
    out.mkdir()
    router.save(out)
    again = Router.load(out)
    assert np.allclose(again.predict(rows), p)
    _, _, latency_ms = again.decide(rows[0])
    _, _, latency_ms = again.decide(rows[1])
    assert latency_ms < 15


def test_apgr_and_cpt_follow_routellm_definitions():
    n = 100
    fast = np.array([1.0] * 50 + [0.0] * 50)
    strong = np.ones(n)
    cost = np.ones(n)
    perfect = Outcome(fast.copy(), fast, strong, cost, cost)  # confidence = fast correctness
    assert cpt(perfect, 0.5) == pytest.approx(0.25, abs=0.011)
    assert cpt(perfect, 0.8) == pytest.approx(0.40, abs=0.011)
    assert apgr(perfect) > 0.7
    rng = np.random.default_rng(0)
    scores = [apgr(Outcome(rng.random(n), fast, strong, cost, cost)) for _ in range(50)]
    assert np.mean(scores) == pytest.approx(0.5, abs=0.05)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orstack", *args], capture_output=True, text=True, timeout=300)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_route_train_cli_writes_router_and_plot(tmp_path):
    rows = synthetic_results()
    base = write_rows(tmp_path / "base.jsonl", rows)
    acc = write_rows(tmp_path / "acc.jsonl", [dict(r, correct=True, latency_ms=40.0) for r in rows])
    out, plot = tmp_path / "router", tmp_path / "rel.png"
    result = run_cli("route", "train", "--results", str(base), "--results-accurate", str(acc), "--optimize",
                     "--plot", str(plot), "-o", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["stage"] == "route" and 0.7 <= manifest["metrics"]["threshold"] <= 0.9
    assert len(manifest["metrics"]["sweep"]) == 11
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_route_train_bad_input(tmp_path):
    rows = synthetic_results(40)
    no_signals = write_rows(tmp_path / "plain.jsonl", [{"id": r["id"], "correct": r["correct"]} for r in rows])
    result = run_cli("route", "train", "--results", str(no_signals), "-o", str(tmp_path / "r"))
    assert result.returncode == 2 and "mean_logprob" in result.stderr
    good = write_rows(tmp_path / "base.jsonl", rows)
    result = run_cli("route", "train", "--results", str(good), "--optimize", "-o", str(tmp_path / "r"))
    assert result.returncode == 2 and "--results-accurate" in result.stderr
    all_right = write_rows(tmp_path / "same.jsonl", [dict(r, correct=True) for r in rows])
    result = run_cli("route", "train", "--results", str(all_right), "-o", str(tmp_path / "r"))
    assert result.returncode == 2 and "nothing to route" in result.stderr
    assert not (tmp_path / "r").exists()
