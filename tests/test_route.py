"""route: calibration, the router's fit/save/load, routing metrics, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_orstack

from orstack.route.calibration import Platt, ece, log_loss
from orstack.route.router import Router, RouterConfig, train_router
from orstack.route.sweep import Outcome, apgr, cpt
from orstack.runtime import Runtime


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


def run_cli(*args: str):
    return run_orstack(*args)


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


# -- route run -------------------------------------------------------------------------------

def make_adapter(base_dir, out, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from orstack.io.checkpoint import load_model

    torch.manual_seed(seed)
    model, _ = load_model(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(random_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"math": str(make_adapter(random_llama, root / "math", 1)),
            "string": str(make_adapter(random_llama, root / "string", 2))}


def small_tasks(n: int = 6) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i), "kind": "numeric",
             "domain": ["math", "string"][i % 2], "max_new_tokens": 4} for i in range(n)]


def test_adapters_hot_swap_on_the_resident_base(random_llama, adapters):
    from orstack.backends.base import open_backend
    from orstack.route.run import AccuratePaths

    base = open_backend(str(random_llama), Runtime(device="cpu"), batch_size=4)
    weight = base.model.model.layers[0].self_attn.q_proj.weight
    pointer, before = weight.data_ptr(), weight.detach().clone()
    prompts = ["1+1=", "abc"]
    plain = [g.token_logprobs for g in base.generate(prompts, max_new_tokens=3, stop=[])]
    paths = AccuratePaths(base, adapters, None, 4)
    outs = {}
    for domain in ("math", "string", "math"):
        backend, label = paths.backend_for(domain)
        assert label == f"modifier:{domain}" and backend is base
        outs[domain] = [g.token_logprobs for g in backend.generate(prompts, max_new_tokens=3, stop=[])]
    assert paths.loaded == ["math", "string"]
    assert outs["math"] != outs["string"] and outs["math"] != plain
    with paths.fast() as fast:
        assert [g.token_logprobs for g in fast.generate(prompts, max_new_tokens=3, stop=[])] == plain
    weight = base.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.data_ptr() == pointer and torch_equal(weight, before)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b))


def test_route_run_forced_modes_and_auto(random_llama, adapters, tmp_path):
    tasks = write_rows(tmp_path / "tasks.jsonl", small_tasks())
    modifiers = [f"--modifier=math={adapters['math']}", f"--modifier=string={adapters['string']}"]
    fast = run_cli("route", "run", str(tasks), "--base", str(random_llama), "--mode", "fast")
    assert fast.returncode == 0, fast.stderr
    rows = [json.loads(line) for line in fast.stdout.splitlines()]
    assert [r["route"]["path"] for r in rows] == ["fast"] * 6
    acc = run_cli("route", "run", str(tasks), "--base", str(random_llama), "--mode", "accurate", *modifiers)
    assert acc.returncode == 0, acc.stderr
    rows = [json.loads(line) for line in acc.stdout.splitlines()]
    assert [r["route"]["path"] for r in rows] == [f"modifier:{t['domain']}" for t in small_tasks()]
    results = [dict(r, mean_logprob=r.get("mean_logprob") or -1.0) for r in synthetic_results()]
    base_rows = write_rows(tmp_path / "base.jsonl", results)
    router = tmp_path / "router"
    assert run_cli("route", "train", "--results", str(base_rows), "-o", str(router)).returncode == 0
    auto = run_cli("route", "run", str(tasks), "--base", str(random_llama), "--router", str(router), *modifiers,
                   "--summary", str(tmp_path / "s.json"))
    assert auto.returncode == 0, auto.stderr
    rows = [json.loads(line) for line in auto.stdout.splitlines()]
    assert all(0 <= r["route"]["p_base_ok"] <= 1 for r in rows)
    assert all((r["route"]["path"] != "fast") == (r["route"]["p_base_ok"] < r["route"]["threshold"]) for r in rows)
    assert json.loads((tmp_path / "s.json").read_text())["tasks"] == 6


def test_route_run_bad_input(random_llama, adapters, tmp_path):
    tasks = write_rows(tmp_path / "tasks.jsonl", small_tasks())
    no_path = run_cli("route", "run", str(tasks), "--base", str(random_llama), "--mode", "accurate",
                      f"--modifier=math={adapters['math']}")
    assert no_path.returncode == 2 and "no accurate path for domain 'string'" in no_path.stderr
    not_adapter = run_cli("route", "run", str(tasks), "--base", str(random_llama), "--mode", "accurate",
                          f"--modifier=math={tmp_path}")
    assert not_adapter.returncode == 2 and "not a LoRA adapter" in not_adapter.stderr
    router = tmp_path / "router"
    rows = [dict(r, model=str(random_llama)) for r in synthetic_results()]
    assert run_cli("route", "train", "--results", str(write_rows(tmp_path / "b.jsonl", rows)),
                   "-o", str(router)).returncode == 0
    other = tmp_path / "other"
    import shutil

    shutil.copytree(random_llama, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    mismatch = run_cli("route", "run", str(tasks), "--base", str(other), "--router", str(router),
                       f"--modifier=math={adapters['math']}", f"--modifier=string={adapters['string']}")
    assert mismatch.returncode == 2 and "weights differ" in mismatch.stderr
    unknown = run_cli("route", "run", str(tasks), "--base", str(random_llama), "--router", str(router),
                      f"--modifier=poetry={adapters['math']}")
    assert unknown.returncode == 2 and "unknown domain 'poetry'" in unknown.stderr
