"""prune and awq on every decoder family (issue 13), on tiny random-init checkpoints.

Per family: the layer-wise calibration reproduces the model; prune's patterns hold for wanda,
magnitude and sparsegpt (per row and 2:4) and the pruned model is the original with those
weights zeroed; the output loads back (orstack, and plain transformers with --no-compress);
AWQ's folds leave the unquantized function unchanged (float64, random scales), packed ==
fake-quant, and where nothing can take a scale (OLMo 2) the scale stays 1 and the run says so.
Unsupported families (mixture-of-experts, gpt2's Conv1D) are refused in one line, before any
weight is read.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_TEXT, run_orstack, tree_hash

from orstack.io.checkpoint import load_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3")
FALLS_OUT = ("gemma", "olmo3", "phi", "olmo", "starcoder2", "cohere", "stablelm")
ALL = FAMILIES + FALLS_OUT
REFUSED = {"qwen2_moe": "mixture-of-experts", "qwen3_moe": "mixture-of-experts", "gpt2": "no nn.Linear"}

# What each family's layer-0 groups fold into, found by the probe (the first Linear of a group -> producer).
EXPECTED_FOLDS = {
    "llama": {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": "self_attn.v_proj",
              "mlp.gate_proj": "post_attention_layernorm", "mlp.down_proj": "mlp.up_proj"},
    "gemma2": {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": "self_attn.v_proj",
               "mlp.gate_proj": "pre_feedforward_layernorm", "mlp.down_proj": "mlp.up_proj"},
    # Phi-3: the v rows of qkv_proj (q 4x64, k 2x64, v 2x64 rows) and the up half of gate_up_proj
    "phi3": {"self_attn.qkv_proj": "input_layernorm", "self_attn.o_proj": "self_attn.qkv_proj[384:512]",
             "mlp.gate_up_proj": "post_attention_layernorm", "mlp.down_proj": "mlp.gate_up_proj[512:1024]"},
    "olmo2": {"self_attn.q_proj": None, "self_attn.o_proj": "self_attn.v_proj",
              "mlp.gate_proj": None, "mlp.down_proj": "mlp.up_proj"},
    "phi": {"self_attn.q_proj": "input_layernorm", "self_attn.dense": "self_attn.v_proj", "mlp.fc2": None},
    "olmo": {"self_attn.q_proj": None, "self_attn.o_proj": "self_attn.v_proj", "mlp.gate_proj": None,
             "mlp.down_proj": "mlp.up_proj"},
}
for _f in ("mistral", "qwen2", "qwen3", "granite", "smollm3", "stablelm"):
    EXPECTED_FOLDS[_f] = EXPECTED_FOLDS["llama"]
EXPECTED_FOLDS["gemma3_text"] = EXPECTED_FOLDS["gemma2"]
EXPECTED_FOLDS["gemma"] = dict(EXPECTED_FOLDS["llama"])
EXPECTED_FOLDS["olmo3"] = EXPECTED_FOLDS["olmo2"]
EXPECTED_FOLDS["starcoder2"] = {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": "self_attn.v_proj",
                                "mlp.c_fc": "post_attention_layernorm", "mlp.c_proj": None}
EXPECTED_FOLDS["cohere"] = {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": "self_attn.v_proj",
                            "mlp.down_proj": "mlp.up_proj"}  # parallel block: q/k/v and gate/up share one norm
OFFSET_NORMS = {"gemma", "gemma2", "gemma3_text"}  # (1 + w) norms, detected by measuring


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(SAMPLE_TEXT, encoding="utf-8")
    return p


def _ids(model, n=2, seq=24, seed=0):
    return torch.randint(3, model.config.vocab_size - 1, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _linears(model):
    from orstack.architectures import decoder_layers, layer_prefix, linear_modules

    return {f"{layer_prefix(model, i)}.{name}": m for i, layer in enumerate(decoder_layers(model))
            for name, m in linear_modules(layer).items()}


# --- structure and layer-wise calibration --------------------------------------------------------

@pytest.mark.parametrize("family", ALL)
def test_layerwise_reproduces_the_model(family, family_checkpoint):
    """Layers run one at a time on the recorded inputs (per-layer kwargs: Gemma 3's two rotary
    tables, sliding-window masks, SmolLM3's NoPE layers) give the model's own final hidden state."""
    from orstack.architectures import final_norm
    from orstack.layerwise import capture_layer_inputs, decoder_layers, run_layer

    model, _ = load_model(family_checkpoint(family), with_tokenizer=False)
    ids = _ids(model, 3, 24)
    inputs = capture_layer_inputs(model, ids, batch_size=2)
    for layer in decoder_layers(model):
        inputs = run_layer(layer, inputs)
    seen = []
    handle = final_norm(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _logits(model, ids)
    handle.remove()
    assert torch.equal(torch.cat(inputs.hidden), seen[0])


@pytest.mark.parametrize("family", ALL)
def test_groups_and_fold_targets_are_found(family, family_checkpoint):
    from orstack.architectures import discover, norm_kind
    from orstack.layerwise import capture_layer_inputs, decoder_layers

    model, _ = load_model(family_checkpoint(family), with_tokenizer=False)
    layer = decoder_layers(model)[0]
    probe = capture_layer_inputs(model, _ids(model, 1, 32), 1)
    groups = discover(layer, *next(probe.batches(layer)))
    assert {g.names[0]: g.fold.label if g.fold else None for g in groups} == EXPECTED_FOLDS[family]
    kinds = {g.fold.norm for g in groups if g.fold is not None and g.fold.kind == "norm"}
    assert kinds == ({"offset"} if family in OFFSET_NORMS else {"scale"} if kinds else set())
    if family in OFFSET_NORMS:
        assert norm_kind(model.get_decoder().norm) == "offset"


@pytest.mark.parametrize("family", ALL)
def test_folds_keep_the_function(family, family_checkpoint):
    """Random per-channel scales folded into every producer the probe found (Gemma's (1 + w):
    w' = (1 + w)/s - 1; Phi-3's v rows and up half) and multiplied into the groups' columns:
    the unquantized logits do not change (float64, so 1e-5 is far above round-off)."""
    from orstack.architectures import discover, norm_gain
    from orstack.awq.search import _apply_fold
    from orstack.layerwise import capture_layer_inputs, decoder_layers, linear_modules, run_layer

    model, _ = load_model(family_checkpoint(family), with_tokenizer=False)
    model.double()
    ids = _ids(model, 2, 24)
    before = _logits(model, ids)
    probe = capture_layer_inputs(model, _ids(model, 1, 32, seed=1), 1)
    gen = torch.Generator().manual_seed(3)
    folded = 0
    with torch.no_grad():
        for layer in decoder_layers(model):
            groups = discover(layer, *next(probe.batches(layer)))
            cols = {n: torch.ones(m.in_features, dtype=torch.float64) for n, m in linear_modules(layer).items()}
            rows = {n: torch.ones(m.out_features, dtype=torch.float64) for n, m in linear_modules(layer).items()}
            for g in groups:
                if g.fold is None:
                    continue
                s = torch.exp(torch.randn(g.fold.n_source, generator=gen, dtype=torch.float64) * 0.5)
                producer = layer.get_submodule(g.fold.module)
                if g.fold.kind == "norm":
                    gain = norm_gain(producer, g.fold.norm).clone()
                _apply_fold(layer, g, s, cols, rows)
                if g.fold.kind == "norm":
                    torch.testing.assert_close(norm_gain(producer, g.fold.norm), gain / s)
                    if g.fold.norm == "offset":  # the stored Gemma weight is (1 + w)/s - 1
                        torch.testing.assert_close(producer.weight, gain / s - 1)
                folded += 1
            probe = run_layer(layer, probe)
    assert folded >= 2 * len(decoder_layers(model))
    after = _logits(model, ids)
    assert (after - before).abs().max().item() < 1e-5 * max(1.0, before.abs().max().item())
    assert (after - before).abs().max().item() < 1e-5


# --- prune ----------------------------------------------------------------------------------------

def _check_pattern(model, pattern):
    for name, m in _linears(model).items():
        w = m.weight.detach()
        if pattern == "2:4":
            zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
            assert bool((zeros >= 2).all()), name
        else:
            per_row = (w == 0).sum(1)
            assert bool((per_row == round(0.5 * w.shape[1])).all()), name


def _zeroed_reference(original, pruned):
    """The original model with the pruned model's zeros applied (and nothing else changed)."""
    ref_linears, linears = _linears(original), _linears(pruned)
    with torch.no_grad():
        for name, m in ref_linears.items():
            m.weight.masked_fill_(linears[name].weight == 0, 0.0)
    return original


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("family", ALL)
def test_prune_patterns_hold(family, method, pattern, family_checkpoint):
    from orstack.prune.core import PruneSpec, prune_model

    path = family_checkpoint(family)
    model, _ = load_model(path, with_tokenizer=False)
    spec = PruneSpec(method=method, sparsity=0.5, pattern=(2, 4) if pattern == "2:4" else None, batch_size=2)
    ids = _ids(model, 4, 32, seed=4)
    prune_model(model, ids, spec)
    _check_pattern(model, pattern)
    reference = _zeroed_reference(load_model(path, with_tokenizer=False)[0], model)
    test_ids = _ids(model, 2, 24, seed=5)
    if method == "sparsegpt":  # kept weights are updated: the zeros are the reference's, not the values
        assert not torch.equal(_logits(model, test_ids), _logits(reference, test_ids))
        for name, m in _linears(model).items():
            assert torch.equal(m.weight == 0, _linears(reference)[name].weight == 0), name
    else:
        torch.testing.assert_close(_logits(model, test_ids), _logits(reference, test_ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES + ("gemma", "phi"))
def test_prune_output_loads_back(family, family_checkpoint, calib, tmp_path):
    """The stage end to end: compressed (orstack reads it) and --no-compress (plain transformers
    reads it); both are the original with the pruned weights zeroed, logit for logit."""
    from transformers import AutoModelForCausalLM

    from orstack.prune import PruneConfig, run
    from orstack.runtime import Runtime

    path = family_checkpoint(family)
    outputs = {}
    for compress in (True, False):
        config = PruneConfig(method="wanda", pattern="2:4", nsamples=4, seqlen=32, batch_size=2, eval_length=64,
                             compress=compress, calib=[str(calib)])
        outputs[compress] = run(path, tmp_path / f"c{int(compress)}", config, Runtime(device="cpu")).output
    ours, _ = load_model(outputs[True], with_tokenizer=False)
    plain = AutoModelForCausalLM.from_pretrained(outputs[False])
    assert type(plain).__name__ == type(ours).__name__
    _check_pattern(ours, "2:4")
    reference = _zeroed_reference(load_model(path, with_tokenizer=False)[0], ours)
    ids = _ids(ours, 2, 24, seed=6)
    expected = _logits(reference, ids)
    assert torch.equal(_logits(ours, ids), expected)
    assert torch.equal(_logits(plain, ids), expected)
    metrics = json.loads((outputs[True] / "orstack.json").read_text())["metrics"]
    assert metrics["sparsity"] == pytest.approx(0.5)


# --- awq ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES + ("gemma", "phi", "olmo"))
def test_awq_packed_equals_fake_quant(family, family_checkpoint, calib, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from orstack.awq import AWQConfig, run
    from orstack.runtime import Runtime

    path = family_checkpoint(family)
    outs = {}
    for fake in (False, True):
        config = AWQConfig(group_size=64, nsamples=4, seqlen=32, batch_size=2, alpha_steps=4, clip_steps=4,
                           fake_quant=fake, calib=[str(calib)])
        outs[fake] = run(path, tmp_path / f"f{int(fake)}", config, Runtime(device="cpu"))
    packed, fake = outs[False].output, outs[True].output
    ours, _ = load_model(packed, with_tokenizer=False)
    reference = AutoModelForCausalLM.from_pretrained(fake)
    theirs = AutoModelForCausalLM.from_pretrained(packed, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, param in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], param), name
        assert torch.equal(theirs.state_dict()[name], param), name
    ids = _ids(ours, 2, 24, seed=7)
    assert torch.equal(_logits(ours, ids), _logits(reference, ids))
    original, _ = load_model(path, with_tokenizer=False)
    assert not torch.equal(_logits(reference, ids), _logits(original, ids))
    metrics = outs[False].metrics
    # the searched scales and clipping do not lose to plain rounding on the calibration data
    assert metrics["output_error"] <= 1.02 * metrics["output_error_rtn"]
    expected_unscaled = [",".join(n for n in group) for group in _unscaled(family)]
    assert metrics.get("unscaled_groups", {}).get("groups", []) == expected_unscaled


def _unscaled(family):
    attn, mlp = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")
    return {"olmo2": [attn, mlp], "olmo": [attn, mlp], "phi": [("mlp.fc2",)]}.get(family, [])


def test_awq_olmo2_keeps_scale_one_where_nothing_takes_it(family_checkpoint, calib, tmp_path):
    """OLMo 2's q/k/v and gate/up read the residual stream: no scale (alpha None), the norms are
    untouched, each quantized weight is within one grid step of the original (no column scale),
    and the run says so once."""
    from orstack.awq.grid import QuantSpec, fake_quantize

    path = family_checkpoint("olmo2")
    out = tmp_path / "awq"
    r = run_orstack("awq", str(path), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--group-size",
                    "64", "--fake-quant", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("nothing to fold a scale into") == 1
    assert "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj; mlp.gate_proj,mlp.up_proj" in r.stderr
    manifest = json.loads((out / "orstack.json").read_text())
    for layer in manifest["metrics"]["layers"]:
        assert layer["alpha"]["self_attn.q_proj"] is None and layer["alpha"]["mlp.gate_proj"] is None
        assert layer["fold"]["self_attn.o_proj"] == "self_attn.v_proj"
    original, _ = load_model(path, with_tokenizer=False)
    quantized, _ = load_model(out, with_tokenizer=False)
    q_state, o_state = quantized.state_dict(), original.state_dict()
    for name, p in o_state.items():
        if p.ndim == 1 and "norm" in name:
            assert torch.equal(q_state[name], p), name
    # Scale 1: column c of the quantized weight is column c of the original plus rounding noise
    # (ratio <w_hat_c, w_c> / |w_c|^2 the same for every column); a column scale s_c would show
    # as that ratio following s_c.
    spreads = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        w, w_hat = o_state[name], q_state[name]
        ratio = (w_hat * w).sum(0) / (w * w).sum(0)
        spreads[name] = float(ratio.std() / ratio.mean())
        assert not torch.equal(w_hat, fake_quantize(w, QuantSpec(4, 64))), name  # clipping was searched
    assert max(spreads.values()) < 0.02, spreads


# --- refused families -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(REFUSED))
@pytest.mark.parametrize("stage", ["prune", "awq"])
def test_unsupported_family_is_one_line_before_loading(family, stage, family_checkpoint, calib, tmp_path):
    import shutil

    path = tmp_path / family
    shutil.copytree(family_checkpoint(family), path)
    for weights in path.glob("*.safetensors"):  # never read: the check needs the config only
        weights.unlink()
    before = tree_hash(path)
    out = tmp_path / "out"
    r = run_orstack(stage, str(path), "--calib", str(calib), "-o", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"unsupported architecture '{family}'" in lines[0] and REFUSED[family] in lines[0]
    assert "supported:" in lines[0] and "llama" in lines[0] and "gemma2" in lines[0] and "phi3" in lines[0]
    assert not out.exists() and tree_hash(path) == before
