"""LoRA, distill train (adapter, --merge, --full), rl and route's hot-swapped modifiers on every
decoder family of issue 13 (tiny random-init checkpoints from tests/families.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_orstack
from families import FAMILIES

from orstack.console import set_quiet
from orstack.runtime import Runtime

# the decoder linears LoRA must adapt (structure.md section 5): Phi-3's are fused
LINEARS = {family: ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
           for family in FAMILIES}
LINEARS["phi3"] = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]

TRAIN = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(4) for b in range(2)]
TRAIN_STRINGS = [{"prompt": f"rev {w}=", "response": w[::-1]} for w in ("abc", "dcba", "fox", "dog", "jugs", "box")]
TASKS = [{"id": "a", "prompt": "2+3=", "answer": "5", "kind": "numeric", "domain": "math", "max_new_tokens": 4},
         {"id": "b", "prompt": "rev abc=", "answer": "cba", "kind": "exact", "domain": "string",
          "max_new_tokens": 4}]
TEXT = "12+345=357 rev abc=cba"


def cli(*args: str):
    result = run_orstack("--quiet", "--threads", "1", *args)
    set_quiet(False)
    return result


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def logits(path: Path | str, text: str = TEXT):
    """Logits of `text` through orstack's own loader (an adapter directory loads as base + adapter)."""
    import torch

    from orstack.io.checkpoint import load_model

    model, tok = load_model(str(path), device="cpu")
    with torch.no_grad():
        return model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits


def train(family_dir: Path, out: Path, data: Path, *extra: str) -> None:
    done = cli("distill", "train", str(family_dir), "--data", str(data), "--max-steps", "2", "--lr", "1e-2",
               "--batch-size", "4", "-o", str(out), *extra)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"math": write_rows(root / "math.jsonl", TRAIN), "string": write_rows(root / "string.jsonl", TRAIN_STRINGS),
            "tasks": write_rows(root / "tasks.jsonl", TASKS)}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_the_decoder_layers_linears(family, family_checkpoint):
    from transformers import AutoModelForCausalLM

    from orstack.train.config import TrainConfig
    from orstack.train.lora import layer_linears, lora_targets

    model = AutoModelForCausalLM.from_pretrained(family_checkpoint(family))
    assert sorted(layer_linears(model)) == LINEARS[family]
    assert lora_targets(model, TrainConfig()) == LINEARS[family]


def test_an_explicit_target_list_the_family_lacks_is_one_line_naming_its_linears(family_checkpoint, data, tmp_path):
    out = tmp_path / "out"
    done = cli("distill", "train", str(family_checkpoint("phi3")), "--data", str(data["math"]), "--max-steps", "1",
               "--target-modules", "q_proj,v_proj", "-o", str(out))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "q_proj, v_proj not found in this phi3 model" in done.stderr and "qkv_proj" in done.stderr
    assert not out.exists()


def test_lora_on_a_model_whose_leaf_names_recur_outside_the_layers_uses_full_names():
    """A linear outside the decoder layers with a layer linear's leaf name (a projector, a head)
    is not adapted: the targets become a regex over the layers' full module names."""
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from orstack.train.config import TrainConfig
    from orstack.train.lora import apply_lora, lora_targets

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    model.model.extra = torch.nn.Module()
    model.model.extra.q_proj = torch.nn.Linear(32, 32)
    targets = lora_targets(model, TrainConfig())
    assert isinstance(targets, str) and re.fullmatch(targets, "model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(targets, "model.extra.q_proj")
    wrapped = apply_lora(model, TrainConfig())
    adapted = {n.removesuffix(".lora_A") for n, _ in wrapped.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == 14 and not any("extra" in n for n in adapted)


@pytest.mark.parametrize("family", FAMILIES)
def test_distill_train_adapter_merge_and_full_on_every_family(family, family_checkpoint, data, tmp_path):
    """The adapter changes outputs and adapts the family's own linears; --merge gives the same
    logits as base + adapter (same seed, same steps); --full changes the weights themselves."""
    import torch

    torch.set_num_threads(1)
    base = family_checkpoint(family)
    train(base, tmp_path / "adapter", data["math"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == LINEARS[family]
    before, adapted = logits(base), logits(tmp_path / "adapter")
    assert (adapted - before).abs().max() > 1e-3
    train(base, tmp_path / "merged", data["math"], "--merge")
    merged = logits(tmp_path / "merged")
    assert torch.allclose(merged, adapted, rtol=0, atol=1e-4), (merged - adapted).abs().max()
    train(base, tmp_path / "full", data["math"], "--full")
    assert (logits(tmp_path / "full") - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_rl_runs_two_steps_on_every_family(family, family_checkpoint, data, tmp_path):
    base = family_checkpoint(family)
    out = tmp_path / "rl"
    done = cli("rl", str(base), "--tasks", str(data["tasks"]), "--max-steps", "2", "--num-generations", "2",
               "--batch-size", "2", "--max-new-tokens", "4", "-o", str(out))
    assert done.returncode == 0, done.stderr
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    # rl hands peft "all-linear" through trl, which writes full names: the same modules, all in the layers
    assert sorted({t.rsplit(".", 1)[-1] for t in targets}) == LINEARS[family]
    assert all(t == t.rsplit(".", 1)[-1] or t.startswith("model.layers.") for t in targets)
    assert json.loads((out / "orstack.json").read_text())["stage"] == "rl"


@pytest.mark.parametrize("family", FAMILIES)
def test_route_hot_swaps_two_modifiers_on_every_family(family, family_checkpoint, data, tmp_path):
    """Two adapters trained by distill train on the family's base: route's resident base gives
    different outputs with each, the base's own with adapters off, and never copies the base."""
    import torch

    from orstack.backends.base import open_backend
    from orstack.route.routing import AccuratePaths

    base_dir = family_checkpoint(family)
    modifiers = {"math": tmp_path / "math", "string": tmp_path / "string"}
    train(base_dir, modifiers["math"], data["math"])
    train(base_dir, modifiers["string"], data["string"])
    torch.set_num_threads(1)  # after the CLI runs, which restore the thread count they found
    base = open_backend(str(base_dir), Runtime(device="cpu"), batch_size=2)
    pointer = base.model.get_input_embeddings().weight.data_ptr()
    prompts = ["2+3=", "rev abc="]
    plain = [g.token_logprobs for g in base.generate(prompts, max_new_tokens=3, stop=[])]
    paths = AccuratePaths(base, {d: str(p) for d, p in modifiers.items()}, None, 2, Runtime(device="cpu"))
    outs = {}
    for domain in ("math", "string", "math"):
        backend, label = paths.backend_for(domain)
        assert backend is base and label == f"modifier:{domain}"
        outs.setdefault(domain, []).append([g.token_logprobs for g in backend.generate(prompts, max_new_tokens=3,
                                                                                       stop=[])])
    assert outs["math"][0] == outs["math"][1]  # swapping back gives the same outputs
    assert outs["math"][0] != outs["string"][0] and outs["math"][0] != plain and outs["string"][0] != plain
    with paths.fast() as fast:
        off = [g.token_logprobs for g in fast.generate(prompts, max_new_tokens=3, stop=[])]
    # the base's own outputs, through peft's wrapper (one prefill log-prob 3.6e-7 apart measured on llama)
    assert sum(off, []) == pytest.approx(sum(plain, []), abs=1e-5)
    assert base.model.get_input_embeddings().weight.data_ptr() == pointer


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "olmo2"])
def test_route_run_cli_with_two_modifiers(family, family_checkpoint, data, tmp_path):
    base = family_checkpoint(family)
    train(base, tmp_path / "math", data["math"])
    train(base, tmp_path / "string", data["string"])
    done = cli("route", "run", str(data["tasks"]), "--base", str(base), "--mode", "accurate",
               f"--modifier=math={tmp_path / 'math'}", f"--modifier=string={tmp_path / 'string'}",
               "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["route"]["path"] for r in rows] == ["modifier:math", "modifier:string"]


# ---------------------------------------------------------------------------- bench and zstd-pack

@pytest.mark.parametrize("family", FAMILIES)
def test_bench_and_zstd_pack_on_every_family(family, family_checkpoint, data, tmp_path):
    """bench writes a row per task without an error; zstd-pack's pack verifies, unpacks to the
    same bytes file for file, and benches to the same rows as the directory."""
    base = family_checkpoint(family)
    done = cli("bench", str(base), "--tasks", str(data["tasks"]), "-o", str(tmp_path / "bench.jsonl"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert len(rows) == len(TASKS) and all(r["error"] is None for r in rows), rows
    pack = tmp_path / "model.orz"
    assert cli("zstd-pack", str(base), "-o", str(pack)).returncode == 0
    verified = cli("zstd-pack", "--verify", str(pack))
    assert verified.returncode == 0, verified.stderr
    assert cli("zstd-pack", "-d", str(pack), "-o", str(tmp_path / "restored")).returncode == 0
    for f in sorted(p for p in base.iterdir() if p.is_file()):
        assert (tmp_path / "restored" / f.name).read_bytes() == f.read_bytes(), f.name
    done = cli("bench", str(pack), "--tasks", str(data["tasks"]), "-o", str(tmp_path / "packed.jsonl"))
    assert done.returncode == 0, done.stderr
    packed = [json.loads(line) for line in (tmp_path / "packed.jsonl").read_text().splitlines()]
    assert [r["output"] for r in packed] == [r["output"] for r in rows]
