"""Quality gates (orstack/gates.py): every stage that changes a model trips (exit 3, nothing
written) on a deliberately damaged output and passes a gentle one; --force writes and marks
the manifest."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import run_orstack, tree_hash

from orstack.errors import GateFailed
from orstack.gates import (
    Gate,
    GateTripped,
    TaskScore,
    Verdict,
    decide,
    ppl_check,
    ppl_in_parent_tokens,
    retention_check,
)


def manifest(path: Path) -> dict:
    return json.loads((path / "orstack.json").read_text())


@pytest.fixture(scope="module")
def small_eval(tiny_trained, tmp_path_factory) -> Path:
    """20 held-out tasks of the tiny, every family (the file runs family by family), with a budget
    that fits its answers: a damaged model babbles to the budget, and that is all it would add."""
    rows = [json.loads(line) for line in tiny_trained.tasks.joinpath("heldout.jsonl").read_text().splitlines()]
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(json.dumps({**r, "max_new_tokens": 8}) + "\n" for r in rows[::50]))
    return path


@pytest.fixture(scope="module")
def heldout_text(tiny_trained, tmp_path_factory) -> Path:
    lines = tiny_trained.tasks.joinpath("heldout.txt").read_text().splitlines()
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text("\n".join(lines[::10]) + "\n")  # 100 lines, every family
    return path


# --- the verdict itself ------------------------------------------------------------------------


def test_gate_directions_and_non_finite_values_fail():
    rise = Gate("ppl_rise", 0.03, "max", "--max-ppl-rise", "%")
    assert rise.check(0.02).passed and not rise.check(0.031).passed
    assert not rise.check(math.nan).passed and not rise.check(None).passed
    keep = Gate("accuracy_retention", 0.97, "min", "--min-retention", "%")
    assert keep.check(0.97).passed and not keep.check(0.969).passed
    assert not ppl_check(10.0, math.inf, 0.5).passed  # a model that became inf does not pass


def test_decide_raises_exit_3_unless_forced_and_records_the_verdict():
    bad = ppl_check(10.0, 12.0, 0.03, on="heldout.txt")
    with pytest.raises(GateTripped) as e:
        decide("prune", [bad])
    assert isinstance(e.value, GateFailed) and e.value.exit_code == 3
    assert "ppl_rise +20.00% (10 -> 12), gate <= +3.00% (--max-ppl-rise)" in str(e.value)
    verdict = decide("prune", [bad], force=True)
    record = verdict.record()
    assert record["forced"] and not record["passed"] and record["checks"][0]["value"] == pytest.approx(0.2)
    assert decide("prune", [ppl_check(10.0, 10.1, 0.03)]).record() == {
        "passed": True, "forced": False, "measured": True, "checks": [
            {"measure": "ppl_rise", "value": pytest.approx(0.01), "limit": 0.03, "direction": "max",
             "option": "--max-ppl-rise", "before": 10.0, "after": 10.1, "on": "heldout", "passed": True}]}
    assert Verdict("prune").record()["measured"] is False


def test_retention_of_a_parent_at_zero_and_perplexity_per_parent_token():
    assert retention_check(TaskScore(0.0, 10), TaskScore(0.0, 10), 0.97).passed
    assert not retention_check(TaskScore(0.5, 10), TaskScore(0.4, 10), 0.97).passed
    from orstack.backends.perplexity import PerplexityResult

    # the same loss spread over twice the tokens halves the per-token figure: per parent token it does not move
    before, after = ppl_in_parent_tokens(PerplexityResult(100.0, 50, 200), PerplexityResult(100.0, 100, 200))
    assert before == pytest.approx(after)


def test_gate_options_are_checked_before_anything_loads(random_llama, tmp_path, sample_text_file):
    out = tmp_path / "out"
    r = run_orstack("prune", random_llama, "--calib", sample_text_file, "--min-retention", "1.5", "-o", out)
    assert r.returncode == 2 and "--min-retention" in r.stderr and not out.exists()
    r = run_orstack("prune", random_llama, "--calib", sample_text_file, "--eval", tmp_path / "nope.jsonl", "-o", out)
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and not out.exists()


# --- prune -----------------------------------------------------------------------------------


def test_prune_gate_trips_at_95_percent_sparsity_and_passes_at_5(tiny_trained, heldout_text, small_eval, tmp_path):
    before = tree_hash(tmp_path)
    common = ("--calib", tiny_trained.tasks / "corpus.txt", "--method", "magnitude", "--nsamples", "2",
              "--seqlen", "32", "--heldout", heldout_text, "--eval-length", "64", "--eval", small_eval)
    damaged = tmp_path / "damaged"
    r = run_orstack("prune", tiny_trained.model, *common, "--sparsity", "0.95", "-o", damaged)
    assert r.returncode == 3, r.stderr
    assert "prune: quality gate failed" in r.stderr and "nothing written" in r.stderr
    assert tree_hash(tmp_path) == before  # not even a temporary directory left

    gentle = tmp_path / "gentle"
    r = run_orstack("prune", tiny_trained.model, *common, "--sparsity", "0.05", "-o", gentle)
    assert r.returncode == 0, r.stderr
    gate = manifest(gentle)["gate"]
    assert gate["passed"] and not gate["forced"]
    assert {c["measure"] for c in gate["checks"]} == {"ppl_rise", "accuracy_retention"}

    r = run_orstack("prune", tiny_trained.model, *common, "--sparsity", "0.95", "--force", "-o", damaged)
    assert r.returncode == 0, r.stderr
    m = manifest(damaged)
    assert m["gate"]["forced"] and not m["gate"]["passed"] and "written anyway (--force)" in r.stderr
    assert m["args"]["force"] is True
    failed = [c for c in m["gate"]["checks"] if not c["passed"]]
    assert failed and all(c["value"] is not None for c in failed)


# --- awq -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_awq_gate_trips_at_3_bits_coarse_groups_and_passes_at_8(tiny_trained, heldout_text, small_eval, tmp_path):
    # the tiny's text perplexity is noise (it learnt answers only): the tasks decide
    common = ("--rtn", "--heldout", heldout_text, "--eval-length", "64", "--fake-quant", "--eval", small_eval)
    damaged = tmp_path / "damaged"
    r = run_orstack("awq", tiny_trained.model, *common, "--bits", "3", "--group-size", "256", "-o", damaged)
    assert r.returncode == 3 and "awq: quality gate failed" in r.stderr and not damaged.exists(), r.stderr
    gentle = tmp_path / "gentle"
    r = run_orstack("awq", tiny_trained.model, *common, "--bits", "8", "-o", gentle)
    assert r.returncode == 0, r.stderr
    assert manifest(gentle)["gate"]["passed"]


# --- vocab-trim ------------------------------------------------------------------------------


def test_vocab_trim_ppl_gate_trips_when_the_cut_splits_held_out_text(tiny_trained, heldout_text, tmp_path):
    # the corpus' 262 most frequent tokens leave the task keywords ("rev", "sort", ...) to bytes
    damaged = tmp_path / "damaged"
    r = run_orstack("vocab-trim", tiny_trained.model, "--corpus", tiny_trained.tasks / "corpus.txt",
                    "--max-vocab", "262", "--validate", heldout_text, "--max-length", "64", "-o", damaged)
    assert r.returncode == 3 and not damaged.exists(), r.stderr
    assert "ppl_rise" in r.stderr and "bits per byte" in r.stderr  # the measures are still shown
    gentle = tmp_path / "gentle"
    r = run_orstack("vocab-trim", tiny_trained.model, "--corpus", tiny_trained.tasks / "corpus.txt",
                    "--validate", heldout_text, "--max-length", "64", "-o", gentle)
    assert r.returncode == 0, r.stderr
    m = manifest(gentle)
    assert m["gate"]["passed"] and m["metrics"]["ppl_after"] <= m["metrics"]["ppl_before"] * 1.03
    assert "bits_per_byte_after" in m["metrics"] and "tokens_per_word_after" in m["metrics"]


# --- gguf ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gguf_q5_k_m_is_gated_and_a_strict_gate_trips(tiny_trained, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    r = run_orstack("gguf", tiny_trained.model, "--type", "q5_k_m", "--tokens", "16", "-o", out)
    assert r.returncode in (0, 3), r.stderr
    assert "gguf q5_k_m" in r.stderr  # gated: a verdict either way, never "not gated"
    strict = tmp_path / "strict.gguf"
    r = run_orstack("gguf", tiny_trained.model, "--type", "q4_0", "--tokens", "16", "--min-agreement", "1",
                    "--max-ppl-change", "0", "-o", strict)
    assert r.returncode == 3 and "gguf q4_0: quality gate failed" in r.stderr and not strict.exists()


# --- distill train and rl --------------------------------------------------------------------


def _junk_rows(path: Path, n: int = 16) -> Path:
    """Training rows that teach every answer to be the same wrong word: a damaging fine-tune."""
    rows = [{"prompt": f"{i}+{i + 1}=", "response": "zzzz", "cluster": 0} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_distill_train_gate_trips_on_a_damaging_fine_tune(tiny_trained, small_eval, tmp_path):
    data = _junk_rows(tmp_path / "junk.jsonl")
    damaged = tmp_path / "damaged"
    r = run_orstack("distill", "train", tiny_trained.model, "--data", data, "--full", "--lr", "1e-2",
                    "--max-steps", "8", "--eval", small_eval, "-o", damaged)
    assert r.returncode == 3 and "accuracy_drop" in r.stderr and not damaged.exists(), r.stderr
    gentle = tmp_path / "gentle"
    r = run_orstack("distill", "train", tiny_trained.model, "--data", data, "--lr", "1e-9", "--max-steps", "1",
                    "--eval", small_eval, "-o", gentle)
    assert r.returncode == 0, r.stderr
    assert manifest(gentle)["gate"]["passed"]


@pytest.mark.slow
def test_rl_gate_trips_on_a_damaging_update(tiny_trained, small_eval, tmp_path):
    damaged = tmp_path / "damaged"
    r = run_orstack("rl", tiny_trained.model, "--tasks", small_eval, "--full", "--lr", "5e-2", "--max-steps", "2",
                    "--max-new-tokens", "8", "--eval", small_eval, "-o", damaged)
    assert r.returncode == 3 and "rl: quality gate failed" in r.stderr and not damaged.exists(), r.stderr


# --- make demo: a broken step stops the pipeline -----------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_demo_stops_with_exit_3_at_an_extreme_sparsity(tiny_trained, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    out.mkdir()
    # everything before prune as the demo would have left it (the trimmed model: the tiny itself)
    shutil.copytree(tiny_trained.model, out / "tiny")
    shutil.copytree(tiny_trained.tasks, out / "tasks")
    shutil.copytree(tiny_trained.model, out / "trimmed")
    r = subprocess.run(["make", "-C", str(root / "examples"), f"OUT={out}", "SMOKE=1", "PRUNE_SPARSITY=0.95",
                        f"ORSTACK={Path(sys.executable).parent / 'orstack'}", f"PYTHON={sys.executable}",
                        f"TINY_FROM={tiny_trained.model.parent}", "-o", f"{out}/trimmed/orstack.json",
                        f"{out}/pruned/orstack.json"], capture_output=True, text=True, timeout=1800)
    assert r.returncode != 0 and "Error 3" in r.stderr, r.stderr[-2000:]
    assert "prune: quality gate failed" in r.stderr and "accuracy_retention" in r.stderr
    assert not (out / "pruned").exists()
