"""orstack gguf on every decoder family of issue 13: llama.cpp's arch name and keys, the tensor
layout it expects, and logits that agree with transformers in the bundled llama.cpp."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_orstack, tree_hash
from families import FAMILIES

from orstack.runtime import Runtime

pytest.importorskip("llama_cpp")

EXTRA = ("gemma", "olmo3")  # fall out of doing it by structure
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2", "granite": "granite", "smollm3": "smollm3",
        "gemma": "gemma", "olmo3": "olmo2"}
GELU = ("gemma", "gemma2", "gemma3_text")  # llama.cpp's fp16 GELU table: ~3e-4 of the logit scale
TEXT = ("The quick brown fox jumps over the lazy dog. 12+345=357\nrev abc=cba\nsort dcba=abcd\n3*4=12\n"
        "cmp 17 9=>\nPack my box with five dozen liquor jugs. 0123456789\n")


def _both_logits(source, gguf_path):
    from orstack.backends import open_backend

    hf, cpp = open_backend(str(source), Runtime()), open_backend(str(gguf_path), Runtime())
    try:
        ids = hf.encode(TEXT)
        assert cpp.encode(TEXT) == ids  # the pre-tokenizer written reproduces the tokenizer's
        return np.asarray(hf.logits(ids), dtype=np.float64), np.asarray(cpp.logits(ids), dtype=np.float64)
    finally:
        cpp.close()


def _prefix_reuse_matches_a_fresh_cache(gguf_path) -> None:
    """One prompt at a time keeps the cache of the prefix the next prompt shares (sliding-window
    and other caches included): the tokens are those of the main context evaluated afresh."""
    from orstack.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(gguf_path), n_threads=1)
    try:
        prompts = ["12+345=", "12+346=", "12+3", "rev abc=", "12+345="]
        for prompt, gen in zip(prompts, backend.generate(prompts, max_new_tokens=5, stop=[])):
            fresh = backend.greedy_tokens(backend.encode_prompt(prompt), gen.output_tokens)
            assert backend.decode(fresh) == gen.text, prompt
    finally:
        backend.close()


def _kl(ref, got) -> float:
    """Mean KL(source || gguf) of the next-token distributions."""
    lp = ref - ref.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got - got.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _metadata(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: f.contents() for name, f in reader.fields.items()}


@pytest.mark.parametrize("family", FAMILIES + EXTRA)
def test_f32_export_agrees_with_transformers(family_checkpoint, tmp_path, family):
    from orstack.gguf import GgufConfig, run
    from orstack.gguf.validate import LOGIT_TOLERANCE

    source = family_checkpoint(family)
    out = tmp_path / f"{family}.gguf"
    result = run(str(source), out, GgufConfig(type="f32", validate=True, n_tokens=24), Runtime())
    v = result.validation
    assert result.export.arch == ARCH[family]
    assert v.passed and v.agreement == 1.0 and v.max_logit_diff <= LOGIT_TOLERANCE * v.logit_scale

    ref, got = _both_logits(source, out)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    diff = np.abs(got - ref).max()
    assert diff <= (1e-3 if family in GELU else 1e-4) * np.abs(ref).max(), diff
    _prefix_reuse_matches_a_fresh_cache(out)

    from transformers import AutoTokenizer

    meta = _metadata(out)
    assert meta["general.architecture"] == ARCH[family]
    assert meta["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(source).chat_template


@pytest.mark.parametrize("family", FAMILIES + EXTRA)
def test_q8_0_export_loads_and_agrees_roughly(family_checkpoint, tmp_path, family):
    from orstack.gguf.export import export_gguf
    from orstack.io.checkpoint import load_model

    source = family_checkpoint(family)
    model, tok = load_model(str(source))
    out = tmp_path / "q8.gguf"
    export_gguf(model, tok, out, "q8_0", progress=False)
    ref, got = _both_logits(source, out)
    # random-init tiny models have many near-tied logits: tolerant measures (measured: argmax
    # 89-100%, mean KL 5e-6 to 7e-3, max |Δ| <= 0.1 of the scale)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85
    assert _kl(ref, got) <= 0.02
    assert np.abs(got - ref).max() <= 0.2 * np.abs(ref).max()


def test_family_keys_and_tensor_layout(family_checkpoint, tmp_path):
    """What llama.cpp reads per family, read back from the files."""
    import gguf

    from orstack.gguf.export import export_gguf
    from orstack.io.checkpoint import load_model

    files = {}
    for family in ("gemma2", "gemma3_text", "granite", "phi3", "qwen3", "llama"):
        model, tok = load_model(str(family_checkpoint(family)))
        files[family] = (tmp_path / f"{family}.gguf", model)
        export_gguf(model, tok, files[family][0], "f32", progress=False)
    g2 = _metadata(files["gemma2"][0])
    assert g2["gemma2.attn_logit_softcapping"] == pytest.approx(10.0)
    assert g2["gemma2.final_logit_softcapping"] == pytest.approx(5.0)
    assert g2["gemma2.attention.sliding_window"] == 8
    assert g2["gemma2.attention.sliding_window_pattern"] == [True, False]
    assert g2["gemma2.attention.key_length"] == 128 and g2["gemma2.attention.value_length"] == 128
    g3 = _metadata(files["gemma3_text"][0])
    assert g3["gemma3.rope.freq_base"] == pytest.approx(1e6) and g3["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
    assert g3["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False]
    gr = _metadata(files["granite"][0])
    assert [gr[f"granite.{k}"] for k in ("attention.scale", "embedding_scale", "residual_scale", "logit_scale")] \
        == pytest.approx([0.02, 12.0, 0.22, 8.0])
    assert not any("phi3" in str(v) for v in _metadata(files["phi3"][0]).get("general.name", []))

    def tensors(family):
        return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(files[family][0])).tensors}

    # Gemma norms (q/k norms included) are stored as 1 + w, the others as w
    g3t, state = tensors("gemma3_text"), files["gemma3_text"][1].state_dict()
    for hf, gg in (("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                   ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                   ("model.layers.0.post_feedforward_layernorm.weight", "blk.0.post_ffw_norm.weight")):
        assert np.allclose(g3t[gg], 1 + state[hf].numpy())
    q3t, state = tensors("qwen3"), files["qwen3"][1].state_dict()
    assert np.allclose(q3t["blk.0.attn_k_norm.weight"], state["model.layers.0.self_attn.k_norm.weight"].numpy())
    assert np.allclose(q3t["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"].numpy())  # NEOX
    lt, state = tensors("llama"), files["llama"][1].state_dict()
    assert not np.allclose(lt["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"].numpy())
    # Phi-3's fused projections stay fused
    p3t, state = tensors("phi3"), files["phi3"][1].state_dict()
    assert np.allclose(p3t["blk.0.attn_qkv.weight"], state["model.layers.0.self_attn.qkv_proj.weight"].numpy())
    assert np.allclose(p3t["blk.0.ffn_up.weight"], state["model.layers.0.mlp.gate_up_proj.weight"].numpy())
    assert "output.weight" not in tensors("gemma2")  # tied


def test_logit_gate_catches_what_argmax_misses(family_checkpoint, tmp_path, monkeypatch):
    """A Gemma 2 file without its softcaps keeps (nearly) every argmax; the logit measure fails it."""
    from orstack.gguf import arch
    from orstack.gguf.export import export_gguf
    from orstack.gguf.validate import validate
    from orstack.io.checkpoint import load_model

    model, tok = load_model(str(family_checkpoint("gemma2")))
    real = arch.layout

    def without_softcaps(config, where="model"):
        shape = real(config, where)
        shape.keys = [(m, v) for m, v in shape.keys if "softcapping" not in m]
        return shape

    monkeypatch.setattr(arch, "layout", without_softcaps)
    out = tmp_path / "nosoftcap.gguf"
    export_gguf(model, tok, out, "f32", progress=False)
    v = validate(model, tok, out, "f32", n_tokens=24)
    assert v.agreement >= 0.9
    assert not v.logits_ok and not v.passed and v.max_logit_diff > 1.0


def test_phi3_in_the_directory_name_exports_and_loads(family_checkpoint, tmp_path):
    """llama.cpp treats a general.name containing "phi3" as Phi-3 and fails on a vocabulary
    without </s> <unk> <s>: the exporter writes a neutral name instead."""
    source = tmp_path / "my-phi3-finetune"
    shutil.copytree(family_checkpoint("llama"), source)
    out = tmp_path / "x.gguf"
    r = run_orstack("gguf", source, "--type", "f32", "--tokens", "8", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "phi3" not in _metadata(out)["general.name"]
    ref, got = _both_logits(source, out)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_unsupported_family_is_one_line_before_weights_load(family_checkpoint, tmp_path, monkeypatch):
    from orstack.errors import BadInput
    from orstack.gguf import GgufConfig, run
    from orstack.gguf.arch import SUPPORTED
    from orstack.io import checkpoint

    source = family_checkpoint("gpt2")
    out = tmp_path / "x.gguf"
    before = tree_hash(tmp_path)
    r = run_orstack("gguf", source, "--type", "f32", "-o", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "unsupported architecture 'gpt2'" in r.stderr and ", ".join(SUPPORTED) in r.stderr
    assert tree_hash(tmp_path) == before

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(checkpoint, "_from_pretrained", no_weights)
    with pytest.raises(BadInput, match="unsupported architecture 'gpt2'"):
        run(str(source), out, GgufConfig(type="f32"), Runtime())


@pytest.mark.parametrize("family, overrides, message", [
    ("smollm3", {"num_hidden_layers": 4, "no_rope_layer_interval": 2}, "hard-codes every 4th layer"),
    ("smollm3", {"num_hidden_layers": 4, "no_rope_layer_interval": 8}, r"rotary on layers \[1, 1, 1, 1\]"),
    ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64 != head_dim 128"),
    ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
     "sliding-window layers"),
    ("granite", {"logits_scaling": "drop"}, "no logits_scaling, which llama.cpp's granite requires"),
])
def test_what_llama_cpp_cannot_run_is_refused_from_the_config(family, overrides, message):
    from transformers import AutoConfig

    from orstack.errors import BadInput
    from orstack.gguf.arch import layout

    kwargs = {"head_dim": 128} if family == "gemma2" else {}
    dropped = [k for k, v in overrides.items() if v == "drop"]
    config = AutoConfig.for_model(family, **kwargs, **{k: v for k, v in overrides.items() if k not in dropped})
    if dropped:  # a config written without the field (transformers' own class always fills it in)
        fields = {k: v for k, v in config.to_dict().items() if k not in dropped}
        config = SimpleNamespace(**fields)
    with pytest.raises(BadInput, match=message):
        layout(config, "m")
