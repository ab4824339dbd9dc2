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
    # the final table's measures: answer perplexity for every artefact, the failing clusters' accuracy
    # on half B whenever the base failed some cluster on half A
    assert all(m["ppl_answers"]["tokens"] > 0 and m["ppl_answers"]["ppl"] > 1 for m in models)
    judged = [json.loads(line) for line in (out / "heldout-b-clusters.jsonl").read_text().splitlines()]
    if any("cluster" in t for t in judged):
        assert all(m["cluster_tasks"] == sum("cluster" in t for t in judged) for m in models)
    half_b = {t["prompt"] for t in judged}
    trained = [json.loads(line) for line in (out / "distill-data.jsonl").read_text().splitlines()]
    assert trained and not half_b & {r["prompt"] for r in trained}


def run_script(name: str, *args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                          text=True, check=True)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_failing_clusters_marks_half_b_by_half_a(tmp_path):
    # half A: the base gets add-1 wrong 2 times in 3 (failing), copy-1 right 2 times in 3 (not failing)
    base_a = [{"id": f"{f}{i}", "family": f, "level": 1, "correct": ok}
              for f, oks in (("add", (False, False, True)), ("copy", (True, True, False))) for i, ok in enumerate(oks)]
    failures = [dict(r, cluster=c, cluster_label=f"c{c}") for r, c in zip(
        [r for r in base_a if not r["correct"]], (4, 4, 7))]
    half_b = [{"id": "b1", "prompt": "1+2=", "family": "add", "level": 1},
              {"id": "b2", "prompt": "copy ab=", "family": "copy", "level": 1},
              {"id": "b3", "prompt": "9+9=", "family": "add", "level": 2}]
    done = run_script("failing_clusters.py", write_rows(tmp_path / "a.jsonl", base_a),
                      write_rows(tmp_path / "f.jsonl", failures), write_rows(tmp_path / "b.jsonl", half_b))
    marked = [json.loads(line) for line in done.stdout.splitlines()]
    assert [t["id"] for t in marked] == ["b1", "b2", "b3"]
    assert (marked[0]["cluster"], marked[0]["cluster_label"]) == (4, "c4")
    assert "cluster" not in marked[1] and "cluster" not in marked[2]
    assert "1 of 3 half-B tasks" in done.stderr


def test_distill_mix_rehearses_and_keeps_half_b_unseen(tmp_path):
    distill = [{"id": f"d{i}", "prompt": f"{i}+1=", "response": str(i + 1)} for i in range(6)]
    train = [{"id": f"t{i}", "prompt": f"copy {c}=", "answer": c} for i, c in enumerate("abcd")]
    half_b = [{"id": "b", "prompt": "2+1="}, {"id": "b2", "prompt": "copy a="}]
    done = run_script("distill_mix.py", write_rows(tmp_path / "d.jsonl", distill),
                      write_rows(tmp_path / "t.jsonl", train), write_rows(tmp_path / "b.jsonl", half_b), Path("2"))
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    prompts = [r["prompt"] for r in rows]
    assert "2+1=" not in prompts and "copy a=" not in prompts
    assert len(rows) == 5 + 2 and [r["response"] for r in rows if r.get("origin") == "rehearsal"] == ["b", "c"]
    assert rows[0].get("origin") == "rehearsal" and rows[-1].get("origin") != "rehearsal"  # spread through the data
