"""route: calibration, the router's fit/save/load, routing metrics, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import run_orstack

from orstack.route.calibration import Platt, chance_ece, ece, log_loss
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


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_route_train_cli_writes_router_and_plot(tmp_path):
    rows = synthetic_results()
    base = write_rows(tmp_path / "base.jsonl", rows)
    acc = write_rows(tmp_path / "acc.jsonl", [dict(r, correct=True, latency_ms=40.0) for r in rows])
    out, plot = tmp_path / "router", tmp_path / "rel.png"
    result = run_orstack("route", "train", "--results", str(base), "--results-accurate", str(acc), "--optimize",
                         "--plot", str(plot), "--max-ece", "0.2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["stage"] == "route" and 0.7 <= manifest["metrics"]["threshold"] <= 0.9
    assert len(manifest["metrics"]["sweep"]) == 11
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert manifest["gate"]["passed"] and manifest["gate"]["checks"][0]["limit"] == 0.2


def test_route_train_bad_input(tmp_path):
    rows = synthetic_results(40)
    no_signals = write_rows(tmp_path / "plain.jsonl", [{"id": r["id"], "correct": r["correct"]} for r in rows])
    result = run_orstack("route", "train", "--results", str(no_signals), "-o", str(tmp_path / "r"))
    assert result.returncode == 2 and "plain.jsonl:1: field 'mean_logprob'" in result.stderr
    twice = write_rows(tmp_path / "twice.jsonl", rows + rows[:1])
    result = run_orstack("route", "train", "--results", str(twice), "-o", str(tmp_path / "r"))
    assert result.returncode == 2 and "twice.jsonl:41: field 'id': duplicate id" in result.stderr
    few = write_rows(tmp_path / "few.jsonl", rows[:5])
    result = run_orstack("route", "train", "--results", str(few), "-o", str(tmp_path / "r"))
    assert result.returncode == 2 and "few.jsonl: route train needs at least 20 result rows, got 5" in result.stderr
    good = write_rows(tmp_path / "base.jsonl", rows)
    result = run_orstack("route", "train", "--results", str(good), "--optimize", "-o", str(tmp_path / "r"))
    assert result.returncode == 2 and "--results-accurate" in result.stderr
    all_right = write_rows(tmp_path / "same.jsonl", [dict(r, correct=True) for r in rows])
    result = run_orstack("route", "train", "--results", str(all_right), "-o", str(tmp_path / "r"))
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
    from orstack.route.routing import AccuratePaths

    base = open_backend(str(random_llama), Runtime(device="cpu"), batch_size=4)
    weight = base.model.model.layers[0].self_attn.q_proj.weight
    pointer, before = weight.data_ptr(), weight.detach().clone()
    prompts = ["1+1=", "abc"]
    plain = [g.token_logprobs for g in base.generate(prompts, max_new_tokens=3, stop=[])]
    paths = AccuratePaths(base, adapters, None, 4, Runtime(device="cpu"))
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
    fast = run_orstack("route", "run", str(tasks), "--base", str(random_llama), "--mode", "fast")
    assert fast.returncode == 0, fast.stderr
    rows = [json.loads(line) for line in fast.stdout.splitlines()]
    assert [r["route"]["path"] for r in rows] == ["fast"] * 6
    acc = run_orstack("route", "run", str(tasks), "--base", str(random_llama), "--mode", "accurate", *modifiers)
    assert acc.returncode == 0, acc.stderr
    rows = [json.loads(line) for line in acc.stdout.splitlines()]
    assert [r["route"]["path"] for r in rows] == [f"modifier:{t['domain']}" for t in small_tasks()]
    results = [dict(r, mean_logprob=r.get("mean_logprob") or -1.0) for r in synthetic_results()]
    base_rows = write_rows(tmp_path / "base.jsonl", results)
    router = tmp_path / "router"
    trained = run_orstack("route", "train", "--results", str(base_rows), "--max-ece", "0.2", "-o", str(router))
    assert trained.returncode == 0, trained.stderr
    auto = run_orstack("route", "run", str(tasks), "--base", str(random_llama), "--router", str(router), *modifiers,
                       "--summary", str(tmp_path / "s.json"))
    assert auto.returncode == 0, auto.stderr
    rows = [json.loads(line) for line in auto.stdout.splitlines()]
    assert all(0 <= r["route"]["p_base_ok"] <= 1 for r in rows)
    assert all((r["route"]["path"] != "fast") == (r["route"]["p_base_ok"] < r["route"]["threshold"]) for r in rows)
    assert json.loads((tmp_path / "s.json").read_text())["tasks"] == 6


def test_route_run_bad_input(random_llama, adapters, tmp_path):
    tasks = write_rows(tmp_path / "tasks.jsonl", small_tasks())
    no_path = run_orstack("route", "run", str(tasks), "--base", str(random_llama), "--mode", "accurate",
                          f"--modifier=math={adapters['math']}")
    assert no_path.returncode == 2 and "no accurate path for domain 'string'" in no_path.stderr
    not_adapter = run_orstack("route", "run", str(tasks), "--base", str(random_llama), "--mode", "accurate",
                              f"--modifier=math={tmp_path}")
    assert not_adapter.returncode == 2 and "not a LoRA adapter" in not_adapter.stderr
    router = tmp_path / "router"
    rows = [dict(r, model=str(random_llama)) for r in synthetic_results()]
    assert run_orstack("route", "train", "--results", str(write_rows(tmp_path / "b.jsonl", rows)),
                       "--max-ece", "0.2", "-o", str(router)).returncode == 0
    other = tmp_path / "other"
    import shutil

    shutil.copytree(random_llama, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    mismatch = run_orstack("route", "run", str(tasks), "--base", str(other), "--router", str(router),
                           f"--modifier=math={adapters['math']}", f"--modifier=string={adapters['string']}")
    assert mismatch.returncode == 2 and "weights differ" in mismatch.stderr
    unknown = run_orstack("route", "run", str(tasks), "--base", str(random_llama), "--router", str(router),
                          f"--modifier=poetry={adapters['math']}")
    assert unknown.returncode == 2 and "unknown domain 'poetry'" in unknown.stderr


# -- config = manifest, and the CLI's defaults ------------------------------------------------

def _cli_defaults(command) -> dict:
    import typer

    app = typer.Typer()
    app.command()(command)
    return {p.name: p for p in typer.main.get_command(app).params}


def _field_defaults(cls) -> dict:
    import dataclasses

    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


def test_route_train_manifest_is_the_config(tmp_path):
    from orstack.io.manifest import config_from_args, config_from_manifest
    from orstack.route import RouterConfig, train

    base = write_rows(tmp_path / "base.jsonl", synthetic_results())
    acc = write_rows(tmp_path / "acc.jsonl", [dict(r, correct=True, latency_ms=40.0) for r in synthetic_results()])
    config = RouterConfig(threshold=0.75, optimize=True, cost_weight=0.1, seed=3, results=str(base),
                          results_accurate=str(acc), max_ece=None, cost="latency")
    result = train(tmp_path / "router", config, Runtime(device="cpu"))
    manifest = json.loads((tmp_path / "router" / "orstack.json").read_text())
    assert config_from_manifest(manifest) == config == config_from_args(RouterConfig, manifest["args"])
    assert manifest["config_class"] == "orstack.route.router:RouterConfig"
    assert manifest["metrics"]["threshold"] == result.router.threshold
    # the same config and seed make the same router
    again = train(tmp_path / "router2", config_from_manifest(manifest), Runtime(device="cpu"))
    rows = synthetic_results()
    assert np.array_equal(again.router.predict(rows), Router.load(tmp_path / "router").predict(rows))
    # the intervals are seeded too
    assert again.router.metrics["routing"] == result.router.metrics["routing"]
    assert again.router.metrics["test_split"]["ece_after_ci95"] == result.router.metrics["test_split"]["ece_after_ci95"]


def test_route_cli_defaults_are_the_config_defaults():
    from orstack.commands.route import run, train
    from orstack.route import RouterConfig, RouteRunConfig

    params, fields = _cli_defaults(train), _field_defaults(RouterConfig)
    for option, name in {"threshold": "threshold", "optimize": "optimize", "cost_weight": "cost_weight",
                         "embedder": "embedder", "results_accurate": "results_accurate", "cost": "cost"}.items():
        assert params[option].default == fields[name], option
    # no --max-ece: the config's 0.05 with the chance allowance; an explicit one is absolute
    assert params["max_ece"].default is None and fields["max_ece"] == 0.05 and fields["ece_chance"] is True
    assert params["results"].required
    params, fields = _cli_defaults(run), _field_defaults(RouteRunConfig)
    for option, name in {"router": "router", "accurate": "accurate", "mode": "mode", "vote": "vote",
                         "compare": "compare", "max_new_tokens": "max_new_tokens", "batch_size": "batch_size"}.items():
        assert params[option].default == fields[name], option
    assert list(params["modifier"].default) == [] and fields["modifiers"] == {}
    assert params["base"].required


# -- votes through Backend.sample -------------------------------------------------------------

def _votes_as_before(backend, tasks, n, temperature, max_new_tokens, seed):
    """The voting code before it went through Backend.sample (transformers' generate directly)."""
    from collections import Counter

    import torch

    from orstack.route.routing import answer_key
    from orstack.tasks.stops import stop_sequences

    torch.manual_seed(seed)
    voted = []
    for task in tasks:
        ids = torch.tensor([backend.encode_prompt(task["prompt"])])
        with torch.inference_mode():
            out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         temperature=temperature, top_k=0, num_return_sequences=n,
                                         max_new_tokens=max_new_tokens, pad_token_id=backend.pad_id)
        texts = [backend.tokenizer.decode(seq[ids.shape[1]:], skip_special_tokens=True) for seq in out]
        stops = stop_sequences(task)
        texts = [min((t.split(s)[0] for s in stops if s), key=len) if stops else t for t in texts]
        keys = [answer_key(task, t) for t in texts]
        winner, votes = Counter(keys).most_common(1)[0]
        voted.append({"output": texts[keys.index(winner)], "agreement": votes / n})
    return voted


def test_votes_through_backend_sample_equal_the_old_votes(random_llama):
    from orstack.backends.base import open_backend
    from orstack.route.routing import vote_answers

    backend = open_backend(str(random_llama), Runtime(device="cpu"), batch_size=4)
    tasks = small_tasks(4) + [{"id": "s", "prompt": "rev abc=", "kind": "exact", "answer": "cba", "stop": ["c"]},
                              {"id": "t", "prompt": "The quick", "kind": "text"}]
    try:
        for seed in (0, 7):
            new = vote_answers(backend, tasks, 5, 0.7, 12, seed)
            assert new == _votes_as_before(backend, tasks, 5, 0.7, 12, seed)
        assert len({v["output"] for v in new}) > 1 and any(v["agreement"] < 1 for v in new)
    finally:
        backend.close()


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_route_run_vote_and_accurate_model(random_llama, tmp_path):
    tasks = write_rows(tmp_path / "tasks.jsonl", small_tasks())
    plain = run_orstack("route", "run", tasks, "--base", random_llama, "--mode", "accurate",
                        "--accurate", random_llama)
    assert plain.returncode == 0, plain.stderr
    rows = _rows(plain)
    assert [r["route"]["path"] for r in rows] == ["accurate"] * 6 and "vote_agreement" not in rows[0]
    fast = _rows(run_orstack("route", "run", tasks, "--base", random_llama, "--mode", "fast"))
    assert [r["output"] for r in rows] == [r["output"] for r in fast]  # the same model on both paths
    voted = [run_orstack("--seed", "5", "route", "run", tasks, "--base", random_llama, "--mode", "accurate",
                         "--accurate", random_llama, "--vote", "3", "-o", tmp_path / f"v{i}.jsonl") for i in (1, 2)]
    assert all(v.returncode == 0 for v in voted), voted[0].stderr
    first, second = ([json.loads(line) for line in (tmp_path / f"v{i}.jsonl").read_text().splitlines()]
                     for i in (1, 2))
    assert [(r["output"], r["vote_agreement"]) for r in first] == [(r["output"], r["vote_agreement"]) for r in second]
    rows = first
    assert all(r["vote_agreement"] in (1 / 3, 2 / 3, 1.0) for r in rows)
    assert all(isinstance(r["correct"], bool) for r in rows)


# -- a GGUF base (llama.cpp) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_base(random_llama, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("gguf") / "base.gguf"
    r = run_orstack("gguf", random_llama, "-o", out, "--type", "f32", "--tokens", "8")
    assert r.returncode == 0, r.stderr
    return out


def test_route_run_with_a_gguf_base(random_llama, gguf_base, adapters, tmp_path):
    tasks = write_rows(tmp_path / "tasks.jsonl", small_tasks())
    fast = run_orstack("route", "run", tasks, "--base", gguf_base, "--mode", "fast")
    assert fast.returncode == 0, fast.stderr
    hf_fast = run_orstack("route", "run", tasks, "--base", random_llama, "--mode", "fast")
    # an f32 GGUF in llama.cpp answers as its source does in transformers
    assert [r["output"] for r in _rows(fast)] == [r["output"] for r in _rows(hf_fast)]

    router = tmp_path / "router"
    results = write_rows(tmp_path / "base.jsonl", [dict(r, model=str(gguf_base)) for r in synthetic_results()])
    assert run_orstack("route", "train", "--results", results, "--max-ece", "0.2", "-o", router).returncode == 0
    assert json.loads((router / "router.json").read_text())["base"]["model"] == str(gguf_base)
    auto = run_orstack("route", "run", tasks, "--base", gguf_base, "--router", router, "--accurate", random_llama,
                       "--compare", "--summary", tmp_path / "s.json")
    assert auto.returncode == 0, auto.stderr
    rows = _rows(auto)
    assert all((r["route"]["path"] == "accurate") == (r["route"]["p_base_ok"] < r["route"]["threshold"])
               for r in rows)
    assert json.loads((tmp_path / "s.json").read_text())["always_accurate_accuracy"] is not None

    accurate = run_orstack("route", "run", tasks, "--base", gguf_base, "--mode", "accurate",
                           "--accurate", random_llama)
    assert accurate.returncode == 0, accurate.stderr
    assert [r["route"]["path"] for r in _rows(accurate)] == ["accurate"] * 6

    for model in (random_llama, gguf_base):  # votes on the transformers and on the llama.cpp accurate path
        voted = run_orstack("route", "run", tasks, "--base", gguf_base, "--router", router, "--mode", "accurate",
                            "--accurate", model, "--vote", "3")
        assert voted.returncode == 0, voted.stderr
        assert all(r["vote_agreement"] in (1 / 3, 2 / 3, 1.0) for r in _rows(voted))

    modifier = run_orstack("route", "run", tasks, "--base", gguf_base, "--mode", "accurate",
                           f"--modifier=math={adapters['math']}", f"--modifier=string={adapters['string']}")
    assert modifier.returncode == 2 and modifier.stdout == ""
    assert len(modifier.stderr.strip().splitlines()) == 1 and "is a GGUF file" in modifier.stderr


# -- bad input: exit 2, one line naming the file (and field), nothing changed on disk ----------

@pytest.fixture(scope="module")
def trained_router(random_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained-router")
    results = write_rows(root / "base.jsonl", [dict(r, model=str(random_llama)) for r in synthetic_results()])
    trained = run_orstack("route", "train", "--results", results, "--max-ece", "0.2", "-o", root / "router")
    assert trained.returncode == 0, trained.stderr
    return root / "router"


def _break_json(router, change):
    spec = json.loads((router / "router.json").read_text())
    change(spec)
    (router / "router.json").write_text(json.dumps(spec))


def _drop_tensor(router, name):
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(router / "router.safetensors"))
    del arrays[name]
    save_file(arrays, str(router / "router.safetensors"))


ROUTER_DAMAGE = {
    "truncated router.json": (lambda r: (r / "router.json").write_bytes((r / "router.json").read_bytes()[:200]),
                              "router.json: not valid JSON"),
    "router.json not an object": (lambda r: (r / "router.json").write_text("[1, 2]"), "router.json: expected"),
    "missing threshold": (lambda r: _break_json(r, lambda s: s.pop("threshold")), "field 'threshold' is missing"),
    "threshold a string": (lambda r: _break_json(r, lambda s: s.update(threshold="high")),
                           "field 'threshold' must be a number"),
    "platt.a null": (lambda r: _break_json(r, lambda s: s["platt"].update(a=None)), "field 'platt.a' must be"),
    "unknown classifier": (lambda r: _break_json(r, lambda s: s.update(classifier="forest")),
                           "field 'classifier' must be"),
    "unknown config key": (lambda r: _break_json(r, lambda s: s["config"].update(colour="red")),
                           "field 'config.colour' is not a router setting"),
    "domains not a list": (lambda r: _break_json(r, lambda s: s["featurizer"].update(domains="math")),
                           "field 'featurizer.domains' must be a list"),
    "truncated weights": (lambda r: (r / "router.safetensors").write_bytes(
        (r / "router.safetensors").read_bytes()[:100]), "router.safetensors: not a readable safetensors file"),
    "missing tensor": (lambda r: _drop_tensor(r, "classifier.0.bias"), "tensor 'classifier.0.bias' is missing"),
    "no weights file": (lambda r: (r / "router.safetensors").unlink(), "not a router directory"),
}


def _snapshot(root) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(result, code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize("case", sorted(ROUTER_DAMAGE))
def test_route_run_damaged_router_is_one_line_exit_2(random_llama, trained_router, tmp_path, case):
    import shutil

    damage, message = ROUTER_DAMAGE[case]
    router = tmp_path / "router"
    shutil.copytree(trained_router, router)
    damage(router)
    tasks = write_rows(tmp_path / "tasks.jsonl", small_tasks())
    out = tmp_path / "routed.jsonl"
    out.write_text("old rows\n")
    before = _snapshot(tmp_path)
    stderr = _one_line_error(run_orstack("route", "run", tasks, "--base", random_llama, "--router", router,
                                         "--accurate", random_llama, "-o", out))
    assert message in stderr and str(router) in stderr
    assert _snapshot(tmp_path) == before


RUN_BAD = {
    # case: (extra arguments, message)
    "no cuda": (("--mode", "fast"), "--device cuda: no CUDA device"),
    "-o is a directory": (("--mode", "fast", "-o", "{dir}"), "is a directory"),
    "-o and --summary on one path": (("--mode", "fast", "-o", "{out}", "--summary", "{out}"), "the same path as -o"),
    "-o on the tasks": (("--mode", "fast", "-o", "{tasks}"), "would overwrite the input"),
    "auto without router": ((), "--mode auto needs --router"),
    "unknown mode": (("--mode", "slow"), "--mode 'slow'"),
    "missing accurate model": (("--mode", "accurate", "--accurate", "{tmp}/nothing"), "nothing: no such checkpoint"),
    "bad vote": (("--mode", "fast", "--vote", "0"), "--vote must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(RUN_BAD))
def test_route_run_bad_input_is_one_line_exit_2(random_llama, tmp_path, case):
    args, message = RUN_BAD[case]
    tasks = write_rows(tmp_path / "tasks.jsonl", small_tasks())
    out, directory = tmp_path / "routed.jsonl", tmp_path / "outdir"
    out.write_text("old rows\n")
    directory.mkdir()
    (directory / "mine.txt").write_text("mine")
    names = {"out": out, "dir": directory, "tasks": tasks, "tmp": tmp_path}
    before = _snapshot(tmp_path)
    device = ["--device", "cuda"] if case == "no cuda" else []
    stderr = _one_line_error(run_orstack(*device, "route", "run", tasks, "--base", random_llama,
                                         *(a.format(**names) for a in args)))
    assert message.format(**names) in stderr
    assert _snapshot(tmp_path) == before


def test_route_train_refuses_outputs_of_the_wrong_type_and_bad_rows(tmp_path):
    rows = synthetic_results(60)
    results = write_rows(tmp_path / "base.jsonl", rows)
    existing = tmp_path / "router-file"
    existing.write_text("a file, not a router directory")
    (tmp_path / "plotdir").mkdir()
    strings = write_rows(tmp_path / "strings.jsonl", [dict(r, correct="no") if i == 3 else r
                                                      for i, r in enumerate(rows)])
    before = _snapshot(tmp_path)
    cases = [
        (("--results", results, "-o", existing), "router-file: is a file, and this output is a directory"),
        (("--results", results, "-o", tmp_path / "r", "--plot", tmp_path / "plotdir"), "--plot"),
        (("--results", results, "-o", results), "would overwrite the input"),
        (("--results", strings, "-o", tmp_path / "r"), "strings.jsonl:4: field 'correct' must be true or false"),
        (("--results", tmp_path / "none.jsonl", "-o", tmp_path / "r"), "none.jsonl: no such file"),
    ]
    for args, message in cases:
        assert message in _one_line_error(run_orstack("route", "train", *args)), args
    assert _snapshot(tmp_path) == before and not (tmp_path / "r").exists()


# -- held-out sweep, intervals, the ECE gate ----------------------------------------------------

def test_threshold_sweep_uses_only_the_heldout_split():
    from orstack.route.router import heldout_indices, optimise_threshold, outcome_for
    from orstack.route.sweep import accuracy_at_threshold

    rows = synthetic_results()
    config = RouterConfig(seed=0)
    test = set(heldout_indices(len(rows), config).tolist())
    # the accurate path is right on the held-out rows and wrong on every row the router saw
    accurate = [dict(r, correct=i in test, output_tokens=3) for i, r in enumerate(rows)]
    router = train_router(rows, config)
    table = optimise_threshold(router, rows, accurate)
    assert router.metrics["sweep_rows"] == len(test) == 80
    held = sorted(test)
    outcome = outcome_for(router, [rows[i] for i in held], [accurate[i] for i in held])
    everything = outcome_for(router, rows, accurate)
    for row in table:
        assert row["accuracy"] == accuracy_at_threshold(outcome, row["threshold"])[0]
    # on all rows the figures would differ (the accurate path is wrong on 320 of them)
    assert any(row["accuracy"] != accuracy_at_threshold(everything, row["threshold"])[0] for row in table)
    routing = router.metrics["routing"]
    assert routing["rows"] == 80 and routing["accuracy_ci95"][0] <= routing["accuracy"] <= routing["accuracy_ci95"][1]
    assert routing["apgr_ci95"][0] < routing["apgr_ci95"][1]


def test_sweep_cost_is_tokens_by_default_and_latency_on_request():
    from orstack.route.router import heldout_indices, optimise_threshold

    rows = synthetic_results()
    accurate = [dict(r, correct=True, output_tokens=20, latency_ms=999.0) for r in rows]
    test = heldout_indices(len(rows), RouterConfig())
    fast_tokens = np.mean([rows[i]["prompt_tokens"] + rows[i]["output_tokens"] for i in test])
    for cost, fast, strong in (("tokens", fast_tokens, 25.0), ("latency", 10.0, 999.0)):
        router = train_router(rows, RouterConfig(cost=cost))
        table = optimise_threshold(router, rows, accurate)
        for row in table:  # every escalated query costs both paths
            assert row["cost"] == pytest.approx(fast + row["strong_share"] * strong)


def test_ece_gate_trips_writes_nothing_and_force_marks_the_manifest(tmp_path):
    from conftest import tree_hash

    base = write_rows(tmp_path / "base.jsonl", synthetic_results())
    acc = write_rows(tmp_path / "acc.jsonl", [dict(r, correct=True) for r in synthetic_results()])
    out, plot = tmp_path / "router", tmp_path / "rel.png"
    argv = ["route", "train", "--results", str(base), "--results-accurate", str(acc), "--plot", str(plot),
            "-o", str(out), "--max-ece", "0.01"]
    before = tree_hash(tmp_path)
    result = run_orstack(*argv)
    assert result.returncode == 3, result.stderr
    assert "route train: quality gate failed: ece" in result.stderr and "(--max-ece)" in result.stderr
    assert tree_hash(tmp_path) == before
    result = run_orstack(*argv, "--force")
    assert result.returncode == 0, result.stderr
    gate = json.loads((out / "orstack.json").read_text())["gate"]
    assert gate["forced"] and not gate["passed"] and gate["checks"][0]["value"] > 0.01
    assert Router.load(out).threshold == 0.8 and plot.exists()
    result = run_orstack("route", "train", "--results", str(base), "-o", str(tmp_path / "r2"), "--cost", "money")
    assert result.returncode == 2 and "--cost" in result.stderr


def test_chance_ece_is_what_a_calibrated_predictor_reads_on_that_many_rows():
    rng = np.random.default_rng(3)
    few, many = rng.random(34), rng.random(3000)
    assert chance_ece(few) > 0.15 > 0.05  # a fixed 0.05 fails a calibrated router on 34 rows
    assert chance_ece(many) < 0.04
    misses = [ece((rng.random(34) < few).astype(float), few) > chance_ece(few) for _ in range(400)]
    assert 0.02 < np.mean(misses) < 0.09  # its 95th percentile: exceeded about 5% of the time


def test_the_default_ece_gate_allows_chance_and_an_explicit_max_ece_does_not(tmp_path):
    """60 rows: 12 test rows, where a calibrated router's ECE is far above 0.05."""
    base = write_rows(tmp_path / "base.jsonl", synthetic_results(60, seed=2))
    trained = run_orstack("route", "train", "--results", str(base), "-o", str(tmp_path / "r"))
    assert trained.returncode == 0, trained.stderr
    report = json.loads((tmp_path / "r" / "orstack.json").read_text())["metrics"]["test_split"]
    assert report["ece_after"] > 0.05 and report["ece_after"] <= report["ece_after_chance95"]
    strict = run_orstack("route", "train", "--results", str(base), "--max-ece", "0.05", "-o", str(tmp_path / "s"))
    assert strict.returncode == 3 and "(--max-ece)" in strict.stderr and not (tmp_path / "s").exists()
