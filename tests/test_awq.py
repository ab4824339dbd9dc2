"""`orstack awq`: group-wise quantization, AWQ scale search, packed checkpoints, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import cli_defaults, run_orstack, tree_hash

from orstack.awq.grid import QuantSpec, fake_quantize, largest_divisor, quantize


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread keeps this file fast on a shared machine (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def refused(result, *named: str) -> str:
    """A bad-input refusal: exit 2, one line on stderr naming every string in `named`, nothing on stdout."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def _no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded before the inputs were checked")


# --- the grid ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,symmetric", [(3, False), (4, False), (8, False), (4, True)])
def test_codes_in_range_and_zero_exact(bits, symmetric):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    w[:, :40] = 0  # pruned weights, and a fully zero group
    w[3] = 0
    spec = QuantSpec(bits, 64, symmetric)
    q = quantize(w, spec)
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    w_hat = q.dequantize()
    assert bool((w_hat[w == 0] == 0).all())
    # error bounded by half a step per group (no clipping)
    step = q.scale.repeat_interleave(64, dim=1)
    assert bool(((w_hat - w).abs() <= step / 2 + 1e-6).all())
    assert (q.zero_point is None) == symmetric


def test_more_bits_less_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    errors = [float((fake_quantize(w, QuantSpec(b, 128)) - w).pow(2).mean()) for b in (3, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


def test_largest_divisor():
    assert largest_divisor(576, 128) == 96
    assert largest_divisor(1536, 128) == 128
    assert largest_divisor(256, 128) == 128


# --- AWQ on a layer with outlier input channels --------------------------------------------

def test_awq_beats_rtn_with_outlier_channels(random_llama):
    """Scale outlier input channels of one layer's norm: AWQ's scaled grid must lower the
    block output error against RTN, and the per-layer report must say so."""
    from transformers import AutoModelForCausalLM

    from orstack.awq.search import AWQConfig, group_sizes, quantize_awq

    model = AutoModelForCausalLM.from_pretrained(random_llama)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:8] = 30.0
            layer.post_attention_layernorm.weight[::50] = 20.0
    ids = torch.randint(3, 290, (4, 48), generator=torch.Generator().manual_seed(0))
    cfg = AWQConfig(nsamples=4, seqlen=48, alpha_steps=10, clip_steps=10)
    result = quantize_awq(model, ids, cfg, group_sizes(model, cfg))
    for report in result.layers:
        assert report.folds == {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": "self_attn.v_proj",
                                "mlp.gate_proj": "post_attention_layernorm", "mlp.down_proj": "mlp.up_proj"}
        assert report.alphas["self_attn.q_proj"] > 0
        assert report.error_awq < 0.8 * report.error_rtn


def test_folds_keep_the_function(random_llama):
    """Folding arbitrary scales into the discovered producers leaves the layer's output unchanged."""
    from transformers import AutoModelForCausalLM

    from orstack.architectures import discover
    from orstack.awq.search import _apply_fold
    from orstack.layerwise import capture_layer_inputs, run_layer

    model = AutoModelForCausalLM.from_pretrained(random_llama)
    ids = torch.randint(3, 290, (1, 32), generator=torch.Generator().manual_seed(2))
    inputs = capture_layer_inputs(model, ids)
    layer = model.model.layers[0]
    before = run_layer(layer, inputs).hidden[0]
    groups = discover(layer, *next(inputs.batches()))
    gen = torch.Generator().manual_seed(3)
    cols = {n: torch.ones(m.in_features) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = {n: torch.ones(m.out_features) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for g in groups:
            _apply_fold(layer, g, torch.rand(g.fold.n_source, generator=gen) + 0.5, cols, rows)
    after = run_layer(layer, inputs).hidden[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_same_result_at_one_and_two_threads(random_llama):
    from transformers import AutoModelForCausalLM

    from orstack.awq.search import AWQConfig, group_sizes, quantize_awq

    ids = torch.randint(3, 290, (4, 48), generator=torch.Generator().manual_seed(0))
    cfg = AWQConfig(nsamples=4, seqlen=48, alpha_steps=8, clip_steps=8)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(random_llama)
        results.append(quantize_awq(model, ids, cfg, group_sizes(model, cfg)))
    torch.set_num_threads(1)
    a, b = results
    assert [r.alphas for r in a.layers] == [r.alphas for r in b.layers]
    for name, q in a.quantized.items():
        assert torch.equal(q.codes, b.quantized[name].codes)
        assert torch.equal(q.scale, b.quantized[name].scale)


def test_mixed_precision_allocation_averages_the_target():
    from orstack.awq.search import allocate_bits

    sens = {f"m{i}": {3: 1.0 + i, 4: 0.5 + i / 2, 5: 0.25 + i / 4} for i in range(10)}
    params = {f"m{i}": 100 for i in range(10)}
    bits = allocate_bits(sens, params, 4, 0.1)
    assert sorted(bits.values()) == [3] + [4] * 8 + [5]
    assert bits["m9"] == 5 and bits["m0"] == 3  # most sensitive gains, least sensitive gives


# --- GPTQ error compensation ---------------------------------------------------------------

def _correlated_problem(seed: int = 0):
    """A weight and the second moment of inputs with correlated, unevenly scaled channels (as
    real activations have): where compensating rounding errors across columns pays."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=gen)
    x = torch.randn(2048, 64, generator=gen) @ torch.randn(64, 256, generator=gen)
    x = x * torch.rand(256, generator=gen).mul(3).add(0.2)
    return w, x.T @ x / x.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error_below_clipped_rtn(act_order):
    from orstack.awq.clip import output_error, search_clip
    from orstack.awq.gptq import gptq_quantize

    w, gram = _correlated_problem()
    spec = QuantSpec(4, 64)
    rtn = output_error(fake_quantize(w, spec) - w, gram)
    clipped = output_error(fake_quantize(w, spec, search_clip(w, gram, spec)) - w, gram)
    q = gptq_quantize(w, gram, spec, act_order=act_order)
    gptq = output_error(q.dequantize() - w, gram)
    assert gptq < 0.7 * clipped < rtn
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    again = gptq_quantize(w, gram, spec, act_order=act_order)  # deterministic
    assert torch.equal(q.codes, again.codes) and torch.equal(q.scale, again.scale)
    assert torch.equal(q.zero_point, again.zero_point)


def test_gptq_keeps_pruned_weights_zero_and_symmetric_grid():
    from orstack.awq.gptq import gptq_quantize

    w, gram = _correlated_problem(1)
    w[:, ::3] = 0
    for symmetric in (False, True):
        q = gptq_quantize(w, gram, QuantSpec(4, 64, symmetric))
        assert bool((q.dequantize()[:, ::3] == 0).all())
        assert (q.zero_point is None) == symmetric


def test_gptq_methods_lower_the_layer_error(random_llama):
    """On a model's first layer (the same inputs for every method): gptq and awq+gptq beat RTN,
    and compensation after the scale search beats the scale search alone."""
    from transformers import AutoModelForCausalLM

    from orstack.awq.search import AWQConfig, group_sizes, quantize_awq

    ids = torch.randint(3, 290, (4, 48), generator=torch.Generator().manual_seed(0))
    first = {}
    for method in ("awq", "gptq", "awq+gptq"):
        model = AutoModelForCausalLM.from_pretrained(random_llama)
        cfg = AWQConfig(method=method, nsamples=4, seqlen=48, alpha_steps=8, clip_steps=8)
        first[method] = quantize_awq(model, ids, cfg, group_sizes(model, cfg)).layers[0]
    rtn = first["awq"].error_rtn
    assert first["gptq"].error_awq < 0.9 * rtn
    assert first["awq+gptq"].error_awq < first["awq"].error_awq < rtn
    assert set(first["gptq"].alphas.values()) == {None}  # no scale search


# --- packed checkpoints through the CLI ----------------------------------------------------------

@pytest.fixture(scope="module")
def packed_pair(random_llama, sample_text_file, tmp_path_factory):
    """The same AWQ + GPTQ run written packed and as fake-quant, from a model with pruned weights
    (GPTQ moves every weight it has not rounded yet: the zeros must survive it)."""
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("awq")
    pruned = base / "pruned"
    model = AutoModelForCausalLM.from_pretrained(random_llama)
    with torch.no_grad():
        for layer in model.model.layers:
            for m in (layer.self_attn.q_proj, layer.mlp.down_proj):
                m.weight[:, ::2] = 0
    model.save_pretrained(pruned)
    (pruned / "tokenizer.json").write_bytes((random_llama / "tokenizer.json").read_bytes())
    (pruned / "tokenizer_config.json").write_bytes((random_llama / "tokenizer_config.json").read_bytes())
    args = ["awq", str(pruned), "--calib", str(sample_text_file), "--nsamples", "4", "--seqlen", "48",
            "--method", "awq+gptq"]
    for out, extra in (("packed", []), ("fake", ["--fake-quant"])):
        r = run_orstack(*args, "-o", str(base / out), *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout == ""
    return pruned, base / "packed", base / "fake"


def test_packed_round_trip_equals_fake_quant(packed_pair):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from orstack.io.checkpoint import detect_format, load_model

    _, packed, fake = packed_pair
    assert detect_format(packed) == "compressed-tensors-pack-quantized"
    with safe_open(str(packed / "model.safetensors"), "pt") as st:
        keys = set(st.keys())
        assert "model.layers.0.self_attn.q_proj.weight_packed" in keys
        assert "model.layers.0.self_attn.q_proj.weight" not in keys
        assert st.get_tensor("model.layers.0.self_attn.q_proj.weight_packed").dtype == torch.int32
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    ours, _ = load_model(packed, with_tokenizer=False)
    reference = AutoModelForCausalLM.from_pretrained(fake)
    theirs = AutoModelForCausalLM.from_pretrained(packed, quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, param in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], param), name
        assert torch.equal(theirs.state_dict()[name], param), name
    packed_bytes = (packed / "model.safetensors").stat().st_size
    assert packed_bytes < 0.6 * (fake / "model.safetensors").stat().st_size


def test_pruned_zeros_stay_zero(packed_pair):
    from orstack.io.checkpoint import load_model

    pruned, packed, _ = packed_pair
    model, _ = load_model(packed, with_tokenizer=False)
    for layer in model.model.layers:
        for m in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert bool((m.weight[:, ::2] == 0).all())
    manifest = json.loads((packed / "orstack.json").read_text())
    assert manifest["metrics"]["zeros_kept"] >= 2 * (256 * 128 + 256 * 256)
    assert manifest["metrics"]["error_reduction_vs_rtn"] > 0


def test_rtn_and_symmetric_and_auto_group(random_llama, tmp_path):
    out = tmp_path / "rtn"
    r = run_orstack("awq", str(random_llama), "--rtn", "--symmetric", "--bits", "8", "--group-size", "auto",
                    "-o", str(out))
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 8 and group["weights"]["symmetric"] is True
    assert group["weights"]["group_size"] == 128
    assert "group sizes (auto)" in r.stderr


# --- --mixed-precision end to end -----------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_outputs(random_llama, sample_text_file, tmp_path_factory):
    """--mixed-precision written packed and as fake-quant, asymmetric and --symmetric:
    {(symmetric, fake_quant): (output directory, stderr)}."""
    base = tmp_path_factory.mktemp("awq-mixed")
    outputs = {}
    for symmetric in (False, True):
        for fake in (False, True):
            out = base / f"{'sym' if symmetric else 'asym'}-{'fake' if fake else 'packed'}"
            r = run_orstack("awq", str(random_llama), "--calib", str(sample_text_file), "--nsamples", "4",
                            "--seqlen", "48", "--mixed-precision", *(["--symmetric"] if symmetric else []),
                            *(["--fake-quant"] if fake else []), "-o", str(out))
            assert r.returncode == 0, r.stderr
            outputs[symmetric, fake] = out, r.stderr
    return outputs


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_mixed_precision_packed_checkpoint_holds_several_widths(mixed_outputs, symmetric):
    packed, stderr = mixed_outputs[symmetric, False]
    groups = json.loads((packed / "config.json").read_text())["quantization_config"]["config_groups"].values()
    widths = {g["weights"]["num_bits"] for g in groups}
    assert len(widths) > 1 and 4 in widths and widths <= {3, 4, 5}
    metrics = json.loads((packed / "orstack.json").read_text())["metrics"]
    assert metrics["bits"] and set(metrics["bits"].values()) <= {3, 5}
    assert metrics["average_bits"] <= 4.0
    assert "mixed precision: average" in stderr


def test_mixed_precision_symmetric_loads_in_transformers_as_fake_quant(mixed_outputs):
    """transformers loads a symmetric mixed-width packed checkpoint as is (each module by its
    own config group): its logits are the fake-quant checkpoint's, bit for bit."""
    from transformers import AutoModelForCausalLM

    packed, stderr = mixed_outputs[True, False]
    fake, _ = mixed_outputs[True, True]
    theirs = AutoModelForCausalLM.from_pretrained(packed)
    reference = AutoModelForCausalLM.from_pretrained(fake)
    assert torch.equal(_logits(theirs), _logits(reference))
    assert "warning" not in stderr


def test_mixed_precision_asymmetric_loads_in_orstack_as_fake_quant(mixed_outputs):
    """transformers 5 cannot load mixed widths with zero points (with dequantize=True it applies
    the first config group's scheme to every module; without, the packed zero points do not fit):
    orstack says so when writing one, and reads it itself."""
    from transformers import AutoModelForCausalLM

    from orstack.io.checkpoint import load_model

    packed, stderr = mixed_outputs[False, False]
    fake, fake_stderr = mixed_outputs[False, True]
    ours, _ = load_model(packed, with_tokenizer=False)
    reference = AutoModelForCausalLM.from_pretrained(fake)
    for name, param in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], param), name
    assert torch.equal(_logits(ours), _logits(reference))
    assert "warning:" in stderr and "--symmetric or --fake-quant" in stderr
    assert "warning" not in fake_stderr


# --- config = manifest ---------------------------------------------------------------------------

def test_manifest_args_rebuild_the_config(random_llama, sample_text_file, tmp_path):
    from orstack.awq import AWQConfig, run
    from orstack.io.manifest import config_from_manifest, read_manifest
    from orstack.runtime import Runtime

    out = tmp_path / "cli"
    r = run_orstack("--seed", "5", "awq", str(random_llama), "--calib", str(sample_text_file), "--bits", "8",
                    "--group-size", "64", "--symmetric", "--fake-quant", "--nsamples", "2", "--seqlen", "16",
                    "--batch-size", "2", "--heldout", str(sample_text_file), "--eval-length", "32", "-o", str(out))
    assert r.returncode == 0, r.stderr
    expected = AWQConfig(bits=8, group_size=64, symmetric=True, fake_quant=True, nsamples=2, seqlen=16, batch_size=2,
                         eval_length=32, seed=5, calib=[str(sample_text_file)], heldout=[str(sample_text_file)])
    manifest = read_manifest(out)
    assert manifest["config_class"] == "orstack.awq.search:AWQConfig"
    assert config_from_manifest(manifest) == expected
    assert manifest["metrics"]["ppl_before"] > 0

    config = AWQConfig(rtn=True, group_size="auto", bits=3, seed=2)
    result = run(random_llama, tmp_path / "lib", config, Runtime(device="cpu", seed=2))
    assert result.layers == [] and result.weights_bytes > 0
    assert config_from_manifest(read_manifest(result.output)) == config


def test_cli_defaults_are_the_config_defaults():
    from orstack.awq import AWQConfig

    cli = cli_defaults("awq")
    # Not options: the global --seed (from the Runtime) and the search's fixed settings.
    not_options = {"seed", "alpha_steps", "search_rows", "clip_steps", "max_shrink", "promote_fraction",
                   "duo_scaling", "gptq_blocksize"}
    as_config = {"group_size": int, "calib": lambda v: list(v or [])}  # how the command converts the option
    fields = {f.name: f for f in dataclasses.fields(AWQConfig)}
    assert set(cli) - {"model", "output", "dry_run"} == set(fields) - not_options  # --dry-run plans, not runs
    for name in set(fields) - not_options:
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert as_config.get(name, lambda v: v)(cli[name]) == default, name


def test_default_seqlen_fits_a_small_context(random_llama, sample_text_file, tmp_path):
    """Without --seqlen the windows are min(512, the model's context) tokens (256 here), as prune's."""
    out = tmp_path / "out"
    r = run_orstack("awq", str(random_llama), "--calib", str(sample_text_file), "--nsamples", "1",
                    "--method", "gptq", "--fake-quant", "-o", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["metrics"]["seqlen"] == 256 and manifest["args"]["seqlen"] is None
    r = run_orstack("awq", str(random_llama), "--calib", str(sample_text_file), "--seqlen", "512",
                    "-o", str(tmp_path / "long"))
    refused(r, "--seqlen 512", "256")


# --- bad input: exit 2, one line naming the option or file, nothing written ------------------------

@pytest.mark.parametrize("extra,named", [
    (["--calib", "/nonexistent/calib.txt"], ["--calib", "/nonexistent/calib.txt", "no such file"]),
    ([], ["--calib", "--rtn"]),
    (["--calib", "{text}", "--bits", "5"], ["--bits 5"]),
    (["--calib", "{text}", "--group-size", "100"], ["--group-size 100", "does not divide"]),
    (["--calib", "{text}", "--group-size", "zero"], ["--group-size zero"]),
    (["--rtn", "--mixed-precision"], ["--mixed-precision", "--rtn"]),
    (["--calib", "{text}", "--method", "sgd"], ["--method sgd", "awq+gptq"]),
    (["--calib", "{text}", "--heldout", "/nonexistent/heldout.txt"], ["--heldout", "/nonexistent/heldout.txt"]),
])
def test_bad_input(random_llama, sample_text_file, tmp_path, monkeypatch, extra, named):
    import orstack.io.checkpoint

    monkeypatch.setattr(orstack.io.checkpoint, "load_model", _no_loading)
    out = tmp_path / "out"
    extra = [str(sample_text_file) if a == "{text}" else a for a in extra]
    refused(run_orstack("awq", str(random_llama), "-o", str(out), *extra), *named)
    assert not out.exists()
    assert not list(tmp_path.glob(".*"))


def test_non_llama_model_refused(tmp_path, sample_text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(src)
    refused(run_orstack("awq", str(src), "--calib", str(sample_text_file), "-o", str(tmp_path / "out")),
            str(src), "unsupported architecture 'gpt2'")
    assert not (tmp_path / "out").exists()


def test_group_size_error_names_layers(tmp_path):
    """SmolLM2's case: width 576 does not take group 128."""
    from conftest import build_random_llama

    src = build_random_llama(tmp_path / "w192", hidden=192)
    before = tree_hash(src)
    line = refused(run_orstack("awq", str(src), "--rtn", "--group-size", "128", "-o", str(tmp_path / "out")),
                   "--group-size 128", "q_proj (width 192)")
    assert "down_proj" not in line
    assert not (tmp_path / "out").exists()
    assert tree_hash(src) == before


def test_device_cuda_without_cuda_exits_2_before_loading(random_llama, sample_text_file, tmp_path, monkeypatch):
    import orstack.io.checkpoint

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(orstack.io.checkpoint, "load_model", _no_loading)
    refused(run_orstack("--device", "cuda", "awq", str(random_llama), "--calib", str(sample_text_file),
                        "-o", str(tmp_path / "out")), "--device cuda", "no CUDA")
    assert not (tmp_path / "out").exists()


# --- the output policy: refused up front, nothing on disk changed --------------------------------

@pytest.mark.parametrize("case", ["existing file", "user directory", "missing parent", "the input"])
def test_output_policy(random_llama, sample_text_file, tmp_path, monkeypatch, case):
    import shutil

    import orstack.io.checkpoint

    source, out = random_llama, tmp_path / "out"
    if case == "existing file":
        out.write_text("my notes\n")
        watched, named = out, "is a file"
    elif case == "user directory":
        out.mkdir()
        (out / "thesis.tex").write_text("mine\n")
        watched, named = out, "not written by orstack"
    elif case == "missing parent":
        out = tmp_path / "nodir" / "out"
        watched, named = out.parent, "does not exist"
    else:
        source = out = tmp_path / "model"
        shutil.copytree(random_llama, source)
        watched, named = source, "would overwrite the input"
    before = tree_hash(watched)
    monkeypatch.setattr(orstack.io.checkpoint, "load_model", _no_loading)
    refused(run_orstack("awq", str(source), "--calib", str(sample_text_file), "-o", str(out)), "-o", str(out), named)
    assert tree_hash(watched) == before
