"""orstack merge: each method against its formula or a direct numpy reference, adapters through peft,
refusals before any weight is read, and the fitness gate."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_random_llama, run_orstack
from safetensors.torch import load_file

from orstack.merge import methods


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> list[Path]:
    """Three random Llamas of one shape and one tokenizer (seeds 0, 1, 2): base, a, b."""
    root = tmp_path_factory.mktemp("merge-models")
    first = build_random_llama(root / "m0", hidden=64, seed=0)
    out = [first]
    for seed in (1, 2):
        path = root / f"m{seed}"
        shutil.copytree(first, path)
        torch.manual_seed(seed)
        weights = {k: v + 0.02 * torch.randn_like(v) for k, v in load_file(first / "model.safetensors").items()}
        from safetensors.torch import save_file

        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        out.append(path)
    return out


def weights_of(path: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(path / name)


def one_line_refusal(result, output: Path, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and result.stdout == "", result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not output.exists()


# -- the methods ---------------------------------------------------------------------------------

def test_linear_with_weights_one_zero_returns_the_first_model_exactly(llamas, tmp_path):
    _, a, b = llamas
    result = run_orstack("merge", a, b, "-o", tmp_path / "out", "--weights", "1,0")
    assert result.returncode == 0, result.stderr
    merged, first = weights_of(tmp_path / "out"), weights_of(a)
    assert merged.keys() == first.keys()
    assert all(torch.equal(merged[k], first[k]) for k in first)
    manifest = json.loads((tmp_path / "out" / "orstack.json").read_text())
    assert [p["path"] for p in manifest["parents"]] == [str(a), str(b)]
    assert {e["path"] for e in manifest["lineage"]} == {str(a), str(b)}
    assert manifest["args"]["weights"] == [1.0, 0.0] and manifest["config_class"].endswith(":MergeConfig")


def test_slerp_ends_are_exact_and_the_middle_keeps_the_formulas_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 30, generator=g), 3 * torch.randn(40, 30, generator=g)
    assert torch.equal(methods.slerp(a, b, 0.0), a) and torch.equal(methods.slerp(a, b, 1.0), b)
    na, nb = a.double().norm().item(), b.double().norm().item()
    cos = (a.double().flatten() @ b.double().flatten()).item() / (na * nb)
    mid = methods.slerp(a, b, 0.5)
    assert math.isclose(mid.double().norm().item(), methods.slerp_norm(na, nb, cos, 0.5), rel_tol=1e-5)
    # equal norms: the point stays on the sphere (a linear mean would shrink it)
    b_same = b / nb * na
    for t in (0.25, 0.5, 0.75):
        assert math.isclose(methods.slerp(a, b_same, t).double().norm().item(), na, rel_tol=1e-5)
    assert methods.linear([a, b_same], [1, 1]).norm().item() < 0.9 * na


def test_slerp_per_layer_factors_and_cli_ends(llamas, tmp_path):
    _, a, b = llamas
    assert run_orstack("merge", a, b, "-o", tmp_path / "t0", "--method", "slerp", "--t", "0").returncode == 0
    merged, first = weights_of(tmp_path / "t0"), weights_of(a)
    assert all(torch.equal(merged[k], first[k]) for k in first)
    assert run_orstack("merge", a, b, "-o", tmp_path / "lay", "--method", "slerp", "--t", "0,1").returncode == 0
    merged, second = weights_of(tmp_path / "lay"), weights_of(b)
    name0, name1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(merged[name0], first[name0]) and torch.equal(merged[name1], second[name1])
    assert torch.equal(merged["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], second["lm_head.weight"])


def _np_ties(base, xs, weights, densities, lam):
    taus = []
    for x, d in zip(xs, densities):
        tau = (x - base).ravel()
        k = int(round(d * tau.size))
        kept = np.zeros_like(tau)
        top = np.argsort(-np.abs(tau))[:k]
        kept[top] = tau[top]
        taus.append(kept.reshape(base.shape))
    return base + lam * _np_disjoint(taus, weights)


def _np_disjoint(taus, weights):
    sign = np.sign(sum(w * t for w, t in zip(weights, taus)))
    num = np.zeros_like(taus[0])
    den = np.zeros_like(taus[0])
    for w, t in zip(weights, taus):
        agree = (np.sign(t) == sign) & (t != 0)
        num += w * t * agree
        den += w * agree
    return np.where(den != 0, num / np.where(den == 0, 1, den), 0)


def test_ties_and_dare_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((16, 12)).astype(np.float32)
    xs = [base + rng.standard_normal((16, 12)).astype(np.float32) for _ in range(3)]
    weights, densities, lam = [1.0, 0.5, 2.0], [0.3, 0.6, 0.9], 0.8
    tb, txs = torch.from_numpy(base), [torch.from_numpy(x) for x in xs]
    got = methods.ties(tb, txs, weights, densities, lam).numpy()
    np.testing.assert_allclose(got, _np_ties(base, xs, weights, densities, lam), rtol=1e-5, atol=1e-6)

    seed, name = 7, "model.layers.0.mlp.up_proj.weight"
    masks = [methods.drop_mask(base.shape, d, methods.tensor_seed(seed, name, i)).numpy()
             for i, d in enumerate(densities)]
    dropped = [(x - base) * m / d for x, m, d in zip(xs, masks, densities)]
    got = methods.dare_linear(tb, txs, weights, densities, lam, seed, name).numpy()
    np.testing.assert_allclose(got, base + lam * sum(w * t for w, t in zip(weights, dropped)), rtol=1e-5, atol=1e-6)
    got = methods.dare_ties(tb, txs, weights, densities, lam, seed, name).numpy()
    np.testing.assert_allclose(got, base + lam * _np_disjoint(dropped, weights), rtol=1e-5, atol=1e-6)
    big = methods.drop_mask((200, 200), 0.3, 1).float().mean().item()
    assert abs(big - 0.3) < 0.01  # each entry kept with probability density


def test_dare_is_reproducible_by_seed(llamas, tmp_path):
    base, a, b = llamas
    args = ["merge", a, b, "--method", "dare-linear", "--base", base, "--density", "0.4"]
    for out, seed in (("s1", "1"), ("s1b", "1"), ("s2", "2")):
        assert run_orstack("--seed", seed, *args, "-o", tmp_path / out).returncode == 0
    one, again, two = (weights_of(tmp_path / o) for o in ("s1", "s1b", "s2"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not torch.equal(one[name], two[name])


def test_task_arithmetic_is_base_plus_lambda_times_weighted_task_vectors(llamas, tmp_path):
    base, a, b = llamas
    result = run_orstack("merge", a, b, "-o", tmp_path / "ta", "--method", "task-arithmetic", "--base", base,
                         "--weights", "0.7,0.3", "--lambda", "1.5")
    assert result.returncode == 0, result.stderr
    m, x0, x1, x2 = (weights_of(p) for p in (tmp_path / "ta", base, a, b))
    for k in x0:
        want = x0[k] + 1.5 * (0.7 * (x1[k] - x0[k]) + 0.3 * (x2[k] - x0[k]))
        torch.testing.assert_close(m[k], want, rtol=1e-5, atol=1e-6)


# -- adapters ------------------------------------------------------------------------------------

def make_adapter(base: Path, out: Path, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
    (out / "orstack.json").write_text(json.dumps({"stage": "distill", "base": str(base),
                                                  "weights_format": "lora-adapter"}))
    return out


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    with torch.no_grad():
        return model(ids).logits


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(ids).logits


@pytest.fixture(scope="module")
def adapters(llamas, tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("merge-adapters")
    base = llamas[0]
    return base, make_adapter(base, root / "a1", 1), make_adapter(base, root / "a2", 2, ("q_proj", "up_proj"))


def test_merged_adapters_load_in_peft_and_compute_the_merge(adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, a1, a2 = adapters
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    result = run_orstack("merge", a1, a2, "-o", tmp_path / "lin", "--weights", "0.25,0.75")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "lin" / "adapter_config.json").read_text())
    assert config["r"] == 8 and json.loads((tmp_path / "lin" / "orstack.json").read_text())["base"] == str(base)
    # the exact reference: base weights + 0.25 delta_1 + 0.75 delta_2, from peft's own merges
    reference = AutoModelForCausalLM.from_pretrained(base)
    state = reference.state_dict()
    for adapter, w in ((a1, 0.25), (a2, 0.75)):
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
        for k, v in merged.state_dict().items():
            state[k] = state[k] + w * (v - AutoModelForCausalLM.from_pretrained(base).state_dict()[k]) \
                if k in state else state[k]
    reference.load_state_dict(state)
    with torch.no_grad():
        want = reference(ids).logits
    torch.testing.assert_close(peft_logits(base, tmp_path / "lin", ids), want, rtol=1e-4, atol=1e-4)
    # a non-linear merge is an adapter too, at the asked rank; --fold gives a checkpoint
    assert run_orstack("merge", a1, a2, "-o", tmp_path / "ties", "--method", "ties", "--rank", "6").returncode == 0
    assert json.loads((tmp_path / "ties" / "adapter_config.json").read_text())["r"] == 6
    peft_logits(base, tmp_path / "ties", ids)
    result = run_orstack("merge", a1, a2, "-o", tmp_path / "fold", "--weights", "0.25,0.75", "--fold")
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(hf_logits(tmp_path / "fold", ids), want, rtol=1e-4, atol=1e-4)


def test_one_adapter_folded_is_peft_merge_and_unload(adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, a1, _ = adapters
    assert run_orstack("merge", a1, "--fold", "-o", tmp_path / "fold").returncode == 0
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(a1)).merge_and_unload()
    got = weights_of(tmp_path / "fold")
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items() if k in got)


def test_adapters_of_different_bases_are_refused(adapters, llamas, tmp_path):
    base, a1, _ = adapters
    other = make_adapter(llamas[1], tmp_path / "other", 3)
    one_line_refusal(run_orstack("merge", a1, other, "-o", tmp_path / "out"), tmp_path / "out",
                     "adapters of different bases")


# -- refusals before any weight is read ----------------------------------------------------------

def test_shape_and_vocabulary_mismatches_name_the_tensor_and_both_shapes(llamas, tmp_path):
    a = llamas[1]
    wide = build_random_llama(tmp_path / "wide", hidden=128, seed=3)
    shutil.copy(a / "tokenizer.json", wide / "tokenizer.json")
    one_line_refusal(run_orstack("merge", a, wide, "-o", tmp_path / "out"), tmp_path / "out",
                     "shapes differ: '", "[300, 64] in", "[300, 128] in")
    vocab = build_random_llama(tmp_path / "vocab", hidden=64, vocab_size=280, seed=3)
    one_line_refusal(run_orstack("merge", a, vocab, "-o", tmp_path / "out"), tmp_path / "out",
                     "vocabularies differ", "vocab_size 300", "[300, 64] in", "[280, 64] in")


def test_architecture_and_tokenizer_mismatches_are_refused(llamas, tmp_path):
    a, b = llamas[1], llamas[2]
    other = tmp_path / "arch"
    shutil.copytree(b, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    one_line_refusal(run_orstack("merge", a, other, "-o", tmp_path / "out"), tmp_path / "out",
                     "architectures differ", "MistralForCausalLM")
    tok = tmp_path / "tok"
    shutil.copytree(b, tok)
    data = json.loads((tok / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tok / "tokenizer.json").write_text(json.dumps(data))
    one_line_refusal(run_orstack("merge", a, tok, "-o", tmp_path / "out"), tmp_path / "out", "tokenizers differ")


@pytest.mark.parametrize("args, words", [
    ([], ["at least two models", "got 1"]),
    (["B", "--method", "frankenmerge"], ["--method frankenmerge", "unknown method"]),
    (["B", "--weights", "1,2,3"], ["--weights", "3 given for 2 models"]),
    (["B", "--method", "ties"], ["needs --base"]),
    (["B", "--method", "slerp", "--t", "1.5"], ["--t"]),
])
def test_bad_options_are_one_line_and_write_nothing(llamas, tmp_path, args, words):
    a, b = llamas[1], llamas[2]
    args = [str(b) if x == "B" else x for x in args]
    one_line_refusal(run_orstack("merge", a, *args, "-o", tmp_path / "out"), tmp_path / "out", *words)


# -- fitness, gate and evolution -----------------------------------------------------------------

def test_a_merge_that_does_not_beat_its_best_input_fails_the_gate(llamas, tmp_path, sample_text_file):
    a = llamas[1]
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    args = ["merge", a, twin, "--heldout", sample_text_file]
    result = run_orstack(*args, "-o", tmp_path / "out")
    assert result.returncode == 3, result.stderr
    assert "quality gate failed" in result.stderr and not (tmp_path / "out").exists()
    result = run_orstack(*args, "--force", "-o", tmp_path / "forced")
    assert result.returncode == 0, result.stderr
    gate = json.loads((tmp_path / "forced" / "orstack.json").read_text())["metrics"]["gate"]
    assert gate["forced"] and not gate["passed"]


def test_evolve_logs_every_candidate_and_writes_the_best_recipe(llamas, tmp_path, sample_text_file):
    base, a, b = llamas
    result = run_orstack("merge", a, b, "-o", tmp_path / "evo", "--method", "ties", "--base", base,
                         "--heldout", sample_text_file, "--evolve", "--generations", "2", "--population", "2",
                         "--log", tmp_path / "log.jsonl", "--force")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 1 and rows[0]["weights"] == [1.0, 1.0] and rows[0]["density"] == [0.5, 0.5]
    manifest = json.loads((tmp_path / "evo" / "orstack.json").read_text())
    evolve = manifest["metrics"]["evolve"]
    assert evolve["best_fitness"] == pytest.approx(max(r["fitness"] for r in rows), abs=1e-6)
    assert evolve["best_fitness"] >= evolve["fixed_recipe_fitness"] == pytest.approx(rows[0]["fitness"], abs=1e-6)
    recipe = manifest["recipe"]["args"]
    assert recipe["evolve"] is False and recipe["weights"] == pytest.approx(manifest["recipe"]["weights"], abs=1e-4)
