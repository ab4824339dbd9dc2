"""bench statistics: paired bootstrap, McNemar, flips, KL divergence, and the gates built on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, build_random_llama, run_orstack, tree_hash

from orstack import stats
from orstack.bench.compare import compare_pairs, compare_rows, parse_fail_under
from orstack.errors import BadInput


def synthetic_pair(n: int, p_ref: float, p_other: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two models' verdicts on n tasks, correlated through a shared task difficulty."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    return difficulty < p_ref, (difficulty + 0.15 * rng.normal(size=n)) < p_other


@pytest.mark.parametrize(("gained", "lost"), [(0, 0), (1, 0), (3, 3), (5, 1), (0, 10), (12, 30), (40, 70),
                                              (300, 260), (1000, 1100)])
def test_mcnemar_is_scipys_exact_binomial(gained, lost):
    from scipy.stats import binomtest

    expected = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    assert stats.mcnemar_exact(gained, lost) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("seed", range(4))
def test_compare_pairs_on_synthetic_pairs_agrees_with_scipy_and_a_direct_bootstrap(seed):
    from scipy.stats import binomtest, bootstrap

    ref, other = synthetic_pair(150 + 50 * seed, 0.6, 0.5 + 0.05 * seed, seed)
    result = compare_pairs(ref, other, seed=seed, n_resamples=4000)
    gained, lost = int((~ref & other).sum()), int((ref & ~other).sum())
    assert (result["gained"], result["lost"]) == (gained, lost) and gained + lost > 0
    assert result["p_value"] == pytest.approx(binomtest(gained, gained + lost, 0.5).pvalue, rel=1e-9)
    d = other.astype(float) - ref.astype(float)
    assert result["difference"] == pytest.approx(d.mean())
    # the direct reference: every resample of task indices at once, the percentile interval
    idx = np.random.default_rng(seed).integers(0, d.size, size=(4000, d.size))
    assert result["ci95"] == pytest.approx(list(np.percentile(d[idx].mean(axis=1), [2.5, 97.5])), abs=1e-12)
    # and scipy's own paired percentile bootstrap (other draws) lands within resampling noise
    scipy_ci = bootstrap((ref.astype(float), other.astype(float)), lambda a, b: np.mean(b - a), paired=True,
                         vectorized=False, n_resamples=4000, method="percentile", rng=seed).confidence_interval
    assert result["ci95"] == pytest.approx([scipy_ci.low, scipy_ci.high], abs=0.02)


def test_bootstrap_is_seeded_reproducible_and_chunk_independent():
    d = np.random.default_rng(0).choice([-1.0, 0.0, 1.0], size=333)
    a = stats.paired_bootstrap(d, n_resamples=2500, seed=7)
    assert stats.paired_bootstrap(d, n_resamples=2500, seed=7) == a
    assert stats.paired_bootstrap(d, n_resamples=2500, seed=8) != a
    drawn = np.concatenate(list(stats.resample_indices(333, 2500, 7)))  # in chunks of 1000
    assert np.array_equal(drawn, np.random.default_rng(7).integers(0, 333, size=(2500, 333)))
    # the generic statistic bootstrap resamples the same way
    generic = stats.bootstrap_interval(lambda idx: d[idx].mean(), d.size, n_resamples=2500, seed=7)
    assert generic == pytest.approx(a, abs=1e-12)


def test_an_equal_pair_has_no_difference_and_p_1():
    verdicts = np.random.default_rng(1).random(80) < 0.5
    result = compare_pairs(verdicts, verdicts)
    assert result["difference"] == 0 and result["ci95"] == [0.0, 0.0] and result["p_value"] == 1.0
    assert result["gained"] == result["lost"] == 0


def test_rows_join_on_id_and_split_by_domain_and_cluster():
    ref = [{"id": i, "correct": i % 2 == 0, "domain": "math" if i < 10 else "text", "cluster": i % 3,
            "cluster_label": f"gap {i % 3}"} for i in range(20)]
    other = [dict(r, correct=True) for r in reversed(ref)] + [{"id": 99, "correct": True}]
    other[0]["correct"] = None  # unscored: left out of the pairing
    result = compare_rows(ref, other)
    assert result["tasks"] == 19 and result["gained"] == 9 and result["lost"] == 0
    assert set(result["by_domain"]) == {"math", "text"}
    assert result["by_domain"]["math"]["gained"] == 5
    assert set(result["by_cluster"]) == {"0", "1", "2"} and result["by_cluster"]["1"]["label"] == "gap 1"
    assert sum(c["tasks"] for c in result["by_cluster"].values()) == 19


@pytest.mark.parametrize(("specs", "expected"), [
    (["0.5"], (0.5, {})), (["math=0.6", "0.1", "text=1"], (0.1, {"math": 0.6, "text": 1.0})), ([], (None, {})),
    ([0.25], (0.25, {})), (["a=b=0.3"], (None, {"a=b": 0.3})),
])
def test_fail_under_specs(specs, expected):
    assert parse_fail_under(specs) == expected


@pytest.mark.parametrize("specs", [["1.5"], ["math="], ["=0.5"], ["x"], ["0.5", "0.6"], ["m=0.1", "m=0.2"], ["-1"]])
def test_bad_fail_under_specs(specs):
    with pytest.raises(BadInput, match="--fail-under"):
        parse_fail_under(specs)


def test_kl_divergence_is_zero_for_itself_and_positive_for_a_perturbed_copy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 300))
    p = stats.log_softmax(logits)
    assert np.array_equal(stats.kl_divergence(p, p), np.zeros(50))
    q = stats.log_softmax(logits + 0.1 * rng.normal(size=logits.shape))
    kl = stats.kl_divergence(p, q)
    assert (kl > 0).all()
    direct = (np.exp(p) * (p - q)).sum(axis=1)
    assert kl == pytest.approx(direct, rel=1e-12)


# -- through the CLI --------------------------------------------------------------------------

def scored_rows(model: str, verdicts, domains=None) -> list[dict]:
    return [{"id": f"t{i}", "model": model, "kind": "exact", "answer": "yes", "output": "yes" if ok else "no",
             "domain": (domains or ["math", "text"])[i % 2]} for i, ok in enumerate(verdicts)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_max_regression_trips_on_a_clearly_worse_model_and_not_on_an_equal_one(tmp_path):
    good = [True] * 45 + [False] * 15
    worse = [False] * 30 + good[30:]  # 30 tasks lost, none gained: 50 points lower, p ~ 2e-9
    rows = write_jsonl(tmp_path / "rows.jsonl", scored_rows("base", good) + scored_rows("worse", worse)
                       + scored_rows("same", good))
    out, summary = tmp_path / "out.jsonl", tmp_path / "s.json"
    before = tree_hash(tmp_path)
    result = run_orstack("bench", "--score", rows, "--max-regression", "2", "-o", out, "--summary", summary)
    assert result.returncode == 3, result.stderr
    assert "more than 2.0 points below base" in result.stderr and "worse -50.0 points" in result.stderr
    assert "same" not in result.stderr.split("points below base")[1]
    assert tree_hash(tmp_path) == before  # nothing written
    result = run_orstack("bench", "--score", rows, "--max-regression", "2", "-o", out, "--summary", summary,
                         "--force")
    assert result.returncode == 3 and out.exists()
    compared = {c["model"]: c for c in json.loads(summary.read_text())["comparisons"]}
    assert compared["worse"]["lost"] == 30 and compared["worse"]["significant"]
    assert compared["worse"]["ci95"][1] < 0 < compared["same"]["p_value"]
    assert compared["same"]["difference"] == 0 and not compared["same"]["significant"]
    assert set(compared["worse"]["by_domain"]) == {"math", "text"}
    assert "vs base (paired)" in result.stderr and "McNemar p" in result.stderr
    # an equal model passes, and a small, insignificant drop passes too
    slightly = good[:]
    slightly[0] = False  # one task lost: 1.7 points, p = 1
    rows = write_jsonl(tmp_path / "rows2.jsonl", scored_rows("base", good) + scored_rows("same", good)
                       + scored_rows("slightly", slightly))
    result = run_orstack("bench", "--score", rows, "--max-regression", "1", "-o", tmp_path / "o2.jsonl")
    assert result.returncode == 0, result.stderr


def test_fail_under_per_domain(tmp_path):
    verdicts = [i % 2 == 1 for i in range(40)]  # text all right, math all wrong
    rows = write_jsonl(tmp_path / "rows.jsonl", scored_rows("m", verdicts))
    result = run_orstack("bench", "--score", rows, "--fail-under", "text=0.9", "--fail-under", "0.4")
    assert result.returncode == 0, result.stderr
    result = run_orstack("bench", "--score", rows, "--fail-under", "text=0.9", "--fail-under", "math=0.1")
    assert result.returncode == 3 and "math accuracy below --fail-under math=0.1: m 0.0" in result.stderr
    assert "text accuracy" not in result.stderr
    result = run_orstack("bench", "--score", rows, "--fail-under", "maths=0.5")
    assert result.returncode == 2 and "rows.jsonl has domain 'maths' (domains: math, text)" in result.stderr
    result = run_orstack("bench", "--score", rows, "--max-regression", "2")
    assert result.returncode == 2 and "rows of one model only" in result.stderr
    result = run_orstack("bench", "--score", rows, "--alpha", "0")
    assert result.returncode == 2 and "--alpha" in result.stderr


def perturbed_copy(source, out, scale: float = 0.02):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(out)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def test_kl_from_the_first_model_hf_gguf_perturbed_and_another_vocabulary(random_llama, tmp_path):
    models = [random_llama, perturbed_copy(random_llama, tmp_path / "perturbed")]
    try:
        import llama_cpp  # noqa: F401

        from orstack.gguf import GgufConfig
        from orstack.gguf import run as export
        from orstack.runtime import Runtime

        gguf = tmp_path / "m.gguf"
        export(str(random_llama), gguf, GgufConfig(type="f32", validate=False), Runtime(device="cpu"))
        models.append(gguf)
    except ImportError:
        pass
    models.append(build_random_llama(tmp_path / "other-vocab", vocab_size=280, hidden=64))
    models.append(random_llama)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT[:700])
    summary = tmp_path / "s.json"
    result = run_orstack("bench", *models, "--ppl", text, "--ppl-max-length", "32", "--summary", summary)
    assert result.returncode == 0, result.stderr
    kl = {c["model"]: c["kl"] for c in json.loads(summary.read_text())["comparisons"][::-1]}
    itself = kl[str(random_llama)]
    assert itself["mean"] == 0 and itself["same_top"] == 1 and itself["positions"] > 100
    assert kl[str(models[1])]["mean"] > 1e-3 and kl[str(models[1])]["positions"] == itself["positions"]
    if len(models) == 5:  # the f32 GGUF in llama.cpp: the same distributions up to float rounding
        assert kl[str(models[2])]["mean"] < 1e-5 and kl[str(models[2])]["positions"] == itself["positions"]
    assert "KL needs one vocabulary" in kl[str(models[-2])]["n/a"]
    assert "KL from model (nats/token)" in result.stderr and "KL n/a" in result.stderr


def test_samples_of_one_task_pair_as_its_share_correct_and_no_shared_task_is_no_number():
    ref = [{"id": "a", "correct": True}, {"id": "b", "correct": False}]
    other = [{"id": "a", "correct": s} for s in (True, False, False, False)] + [{"id": "b", "correct": True}]
    result = compare_rows(ref, other)
    assert result["tasks"] == 2 and result["accuracy"] == pytest.approx((0.25 + 1) / 2)
    assert (result["gained"], result["lost"]) == (1, 1) and result["p_value"] == 1.0
    disjoint = compare_rows(ref, [{"id": "z", "correct": True}])
    assert disjoint["tasks"] == 0 and disjoint["difference"] is None and disjoint["ci95"] == [None, None]
    json.dumps(disjoint, allow_nan=False)  # the --summary stays valid JSON


class _FakeBackend:
    """Character tokens and seeded logits: enough of the Backend protocol for KLReference."""

    def __init__(self, name: str, noise: float) -> None:
        self.name, self.noise = name, noise

    def encode(self, text):
        return [ord(c) % 40 + 1 for c in text]

    def _prefix_token(self):
        return 0

    def context_length(self):
        return 64

    def logits(self, ids):
        base = np.random.default_rng(sum(ids)).normal(size=(len(ids), 41))
        return base + self.noise * np.random.default_rng(len(ids)).normal(size=base.shape)


def test_kl_reference_in_chunks_equals_the_direct_computation(tmp_path, monkeypatch):
    from orstack.bench import compare

    monkeypatch.setattr(compare, "_ROWS", 5)  # several chunks per window, a ragged last one
    text = SAMPLE_TEXT[:300]
    ref, other = _FakeBackend("ref", 0.0), _FakeBackend("other", 0.3)
    kl = compare.KLReference(tmp_path, [text], rule="rolling")
    assert kl.measure(ref, 32) is None
    got = kl.measure(other, 32)
    expected, positions = [], 0
    for w in compare.kl_windows(ref, [text], max_length=32, rule="rolling"):
        n = len(w.input_ids)
        p = stats.log_softmax(ref.logits(w.input_ids)[n - w.n_scored : n]).astype(np.float32)
        q = stats.log_softmax(other.logits(w.input_ids)[n - w.n_scored : n]).astype(np.float32)
        expected.append(stats.kl_divergence(p, q))
        positions += w.n_scored
    assert got["positions"] == positions == len(text)
    assert got["mean"] == pytest.approx(np.concatenate(expected).mean(), rel=1e-12)
