"""End to end: the examples pipeline at its smallest settings, every stage on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_examples_pipeline_smoke(tiny_trained, tmp_path):
    out = tmp_path / "demo-out"
    env = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1", ORSTACK_CACHE=str(tmp_path / "cache"),
               PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run(
        ["make", "-C", str(ROOT / "examples"), "demo", "SMOKE=1", f"OUT={out}", f"ORSTACK={BIN / 'orstack'}",
         f"PYTHON={sys.executable}", f"TINY_FROM={tiny_trained.model.parent}"],
        capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"] if isinstance(summary, dict) and "models" in summary else summary
    assert len(models) == 11
    routed = [json.loads(line) for line in (out / "routed.jsonl").read_text().splitlines()]
    assert routed and all("route" in r for r in routed)
    for artefact in ("pruned", "awq", "trimmed", "distilled", "rl", "merged", "router"):
        assert (out / artefact / "orstack.json").exists() or (out / artefact / "router.json").exists()
    assert (out / "awq-q4_1.gguf").stat().st_size > 0 and (out / "trimmed.orz").stat().st_size > 0
    assert (out / "pipeline.png").read_bytes()[:4] == b"\x89PNG"
