"""orstack gguf: GGUF export checked in llama.cpp, K-quants against ggml's reference."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orstack.gguf import kquants
from orstack.gguf.export import TYPES, export_gguf

llama_cpp = pytest.importorskip("llama_cpp")

SAMPLE = ("The quick brown fox jumps over the lazy dog. 12+345=357\nrev abc=cba\nsort dcba=abcd\n"
          "prevent reverse copy cmp 17 9=>\n  indented  text\twith tabs, 3.14159 and ünïcødé — 日本語 🙂\n"
          "copy kite=kite\ncmp 5 12=<\n")


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def _load(spec):
    from orstack.io.checkpoint import load_model

    return load_model(str(spec))


def _llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=1, **kw)


def _logits_vs_transformers(model, tok, path):
    torch = _torch()
    llm = _llama(path, logits_all=True, type_k=0, type_v=0)
    ids = tok(SAMPLE[:120])["input_ids"]
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    llm.close()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return np.abs(ours - ref).max(), (ours.argmax(-1) == ref.argmax(-1)).mean()


# -- K-quants ---------------------------------------------------------------------------------

def _ggml_ref(name: str, x: np.ndarray) -> np.ndarray:
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // 256 * kquants.BLOCK_BYTES[name], dtype=np.uint8)
    getattr(lib, f"quantize_row_{name[:2].lower()}_K_ref")(x.ctypes.data_as(ctypes.c_void_p),
                                                            out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquants_are_byte_identical_to_ggml_reference(name):
    import gguf

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal((16, 512)) * 0.02, rng.standard_t(2, (16, 512)) * 0.01,
                        np.abs(rng.standard_normal((2, 512)))]).astype(np.float32)
    x[0] = 0  # an all-zero super-block
    x[1, :32] = 0.5  # a flat sub-block
    ours = kquants.QUANTIZERS[name](x)
    assert ours.shape == (x.shape[0], 2 * kquants.BLOCK_BYTES[name])
    assert np.array_equal(ours.reshape(-1), _ggml_ref(name, x))
    back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType[name])
    assert back.shape == x.shape
    rel = np.sqrt(((back - x) ** 2).mean()) / np.sqrt((x ** 2).mean())
    assert rel < {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[name]


def test_kquants_refuse_rows_not_multiple_of_256():
    with pytest.raises(ValueError):
        kquants.quantize_q4_k(np.zeros((2, 288), dtype=np.float32))


# -- export and llama.cpp ---------------------------------------------------------------------

def test_f32_export_matches_transformers_logits(random_llama, tmp_path):
    model, tok = _load(random_llama)
    out = tmp_path / "m.gguf"
    export_gguf(model, tok, out, "f32", progress=False)
    diff, agree = _logits_vs_transformers(model, tok, out)
    assert diff < 1e-4 and agree == 1.0


def test_qwen2_with_biases_matches_transformers_logits(random_llama, tmp_path):
    torch = _torch()
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(random_llama)
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases large enough to matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    out = tmp_path / "qwen2.gguf"
    export_gguf(model, tok, out, "f32", progress=False)
    diff, agree = _logits_vs_transformers(model, tok, out)
    assert diff < 1e-4 and agree == 1.0


@pytest.mark.parametrize("qtype", TYPES)
def test_every_type_loads_in_llama_cpp(random_llama, tmp_path, qtype):
    import gguf

    model, tok = _load(random_llama)
    out = tmp_path / f"{qtype}.gguf"
    result = export_gguf(model, tok, out, qtype, progress=False)
    reader = gguf.GGUFReader(str(out))
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    planned = {t.name: t.ggml_type for t in result.tensors}
    assert stored == planned
    assert stored["blk.0.attn_norm.weight"] == "F32"
    if qtype.endswith("_m"):  # 2 layers: layer 1 gets the Q6_K treatment; output Q6_K
        base = qtype[:4].upper()
        assert stored["blk.0.attn_v.weight"] == base and stored["blk.1.attn_v.weight"] == "Q6_K"
        assert stored["blk.0.attn_q.weight"] == base
        assert stored["blk.1.ffn_down.weight"] == "Q6_K" and stored["output.weight"] == "Q6_K"
    else:
        assert stored["blk.0.attn_q.weight"] == {"f32": "F32"}.get(qtype, qtype.upper())
    llm = _llama(out, logits_all=True)
    llm.eval(tok("The quick brown fox")["input_ids"])
    assert np.isfinite(llm.scores[:4]).all()
    llm.close()


def test_k_quant_data_in_file_dequantizes_to_our_values(random_llama, tmp_path):
    import gguf

    from orstack.gguf.export import _permute_rotary, hf_tensors

    model, tok = _load(random_llama)
    out = tmp_path / "q4k.gguf"
    export_gguf(model, tok, out, "q4_k", progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    source = dict(hf_tensors(model))
    w = _permute_rotary(source["model.layers.0.self_attn.q_proj.weight"], model.config.num_attention_heads)
    t = tensors["blk.0.attn_q.weight"]
    from_file = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q4_K)
    expected = gguf.quants.dequantize(kquants.quantize_q4_k(w), gguf.GGMLQuantizationType.Q4_K)
    assert np.array_equal(from_file.reshape(w.shape), expected)
    assert np.abs(from_file.reshape(w.shape) - w).max() < 0.25 * np.abs(w).max()


def test_rows_not_fitting_a_block_fall_back_and_are_listed(tmp_path):
    from conftest import build_random_llama

    src = build_random_llama(tmp_path / "w160", hidden=160)  # 160: multiple of 32, not of 256
    model, tok = _load(src)
    out = tmp_path / "fb.gguf"
    result = export_gguf(model, tok, out, "q4_k", progress=False)
    types = {t.name: (t.ggml_type, t.note) for t in result.tensors}
    assert types["blk.0.attn_q.weight"][0] == "Q5_0" and "not a multiple of 256" in types["blk.0.attn_q.weight"][1]
    llm = _llama(out)
    assert llm.tokenize(b"abc", add_bos=False)
    llm.close()


# -- tokenizer --------------------------------------------------------------------------------

def _tokenizer_agrees(tok, out: Path) -> None:
    from orstack.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(out), n_ctx=64)
    try:
        for text in [SAMPLE, *SAMPLE.splitlines(), " leading space", "trailing space ", "a  b   c"]:
            hf = tok(text, add_special_tokens=False)["input_ids"]
            ours = backend.encode(text)
            assert ours == hf, text
            assert backend.decode(ours) == tok.decode(hf, skip_special_tokens=True)
        assert backend.encode_prompt("12+3=") == tok("12+3=")["input_ids"]
    finally:
        backend.close()


def test_tokenizer_gpt2_pre_tokenizer_agrees(random_llama, tmp_path):
    model, tok = _load(random_llama)
    out = tmp_path / "tok.gguf"
    export_gguf(model, tok, out, "f16", progress=False)
    import gguf

    assert bytes(gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    _tokenizer_agrees(tok, out)


def test_tokenizer_smollm_digits_pre_tokenizer_agrees(random_llama, tmp_path):
    from tokenizers import pre_tokenizers

    model, tok = _load(random_llama)
    # SmolLM2's tokenizer.json pre-tokenizer: single digits, then GPT-2's byte-level regex.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    out = tmp_path / "smollm.gguf"
    export_gguf(model, tok, out, "f16", progress=False)
    import gguf

    assert bytes(gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"
    _tokenizer_agrees(tok, out)


def test_tiny_default_tokenizer_agrees(tmp_path):
    from conftest import build_random_llama

    from orstack.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    src = build_random_llama(tmp_path / "m", vocab_size=300)
    model, _ = _load(src)
    model.resize_token_embeddings(len(tok))
    out = tmp_path / "tiny-tok.gguf"
    result = export_gguf(model, tok, out, "f16", progress=False)
    assert any("user-defined" in n for n in result.vocab_notes)
    _tokenizer_agrees(tok, out)


def _sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer.json: BPE with byte fallback, '▁' for spaces, <0xXX> byte tokens."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(SAMPLE.splitlines(), trainers.BpeTrainer(vocab_size=200))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_agrees(random_llama, tmp_path):
    import gguf

    tok = _sentencepiece_style_tokenizer()
    model, _ = _load(random_llama)
    model.resize_token_embeddings(len(tok))
    out = tmp_path / "spm.gguf"
    export_gguf(model, tok, out, "f16", progress=False)
    fields = gguf.GGUFReader(str(out)).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    _tokenizer_agrees(tok, out)


def test_unreproducible_pre_tokenizer_is_refused(random_llama, tmp_path):
    from tokenizers import Regex, pre_tokenizers

    from orstack.errors import BadInput

    model, tok = _load(random_llama)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    with pytest.raises(BadInput, match="no llama.cpp pre-tokenizer"):
        export_gguf(model, tok, tmp_path / "x.gguf", "f16", progress=False)


# -- the llama.cpp bench backend --------------------------------------------------------------

def test_llama_cpp_backend_matches_transformers_backend(random_llama, tmp_path):
    _torch()
    from orstack.backends.hf import HFBackend
    from orstack.backends.llamacpp import LlamaCppBackend

    model, tok = _load(random_llama)
    out = tmp_path / "m.gguf"
    export_gguf(model, tok, out, "f32", progress=False)
    hf, ll = HFBackend(str(random_llama)), LlamaCppBackend(str(out))
    try:
        for rule in ("rolling", "llama.cpp"):
            a = hf.perplexity([SAMPLE * 3, SAMPLE[:40]], max_length=64, rule=rule)
            b = ll.perplexity([SAMPLE * 3, SAMPLE[:40]], max_length=64, rule=rule)
            assert (a.n_tokens, a.n_bytes) == (b.n_tokens, b.n_bytes)
            assert b.ppl == pytest.approx(a.ppl, rel=1e-5)
        a = hf.loglikelihoods(["12+3", "rev "], ["45=", "abc"])
        b = ll.loglikelihoods(["12+3", "rev "], ["45=", "abc"])
        assert b == pytest.approx(a, rel=1e-4)
        g1 = hf.generate(["The quick", "rev abc="], max_new_tokens=12, stop=["\n"])
        g2 = ll.generate(["The quick", "rev abc="], max_new_tokens=12, stop=["\n"])
        for x, y in zip(g1, g2):
            assert (x.text, x.prompt_tokens, x.output_tokens) == (y.text, y.prompt_tokens, y.output_tokens)
            assert y.token_logprobs == pytest.approx(x.token_logprobs, abs=1e-4)
            assert y.token_entropies == pytest.approx(x.token_entropies, abs=1e-4)
        assert ll.size_bytes() == out.stat().st_size
    finally:
        hf.close()
        ll.close()


# -- the command ------------------------------------------------------------------------------

def _run(*args):
    return subprocess.run([sys.executable, "-m", "orstack", "gguf", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"})


def test_cli_validates_tiny_trained_and_writes(tiny_trained, tmp_path):
    out = tmp_path / "tiny.gguf"
    r = _run(tiny_trained.model, "-o", out, "--type", "f16", "--prompts", tiny_trained.tasks / "heldout.jsonl",
             "--text", tiny_trained.tasks / "heldout.txt", "--tokens", "40")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "greedy agreement" in r.stderr and out.is_file()


def test_failed_gate_writes_nothing(random_llama, tmp_path, monkeypatch):
    from orstack.errors import GateFailed
    from orstack.gguf import GgufConfig, convert, validate

    monkeypatch.setitem(validate.GATES, "q4_0", 1.01)  # an impossible gate
    out = tmp_path / "gated.gguf"
    with pytest.raises(GateFailed, match="nothing written"):
        convert(str(random_llama), out, GgufConfig(type="q4_0", validate=True, n_tokens=8))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_inputs_exit_2_and_write_nothing(random_llama, tmp_path):
    _torch()
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=300, bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    out = tmp_path / "x.gguf"
    for args in [(gpt2, "-o", out), (random_llama, "-o", out, "--type", "q3_k"), (tmp_path / "missing", "-o", out)]:
        r = _run(*args)
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()
    assert "unsupported architecture 'gpt2'" in _run(gpt2, "-o", out).stderr


# -- packed AWQ -> Q4_1 -----------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_awq_maps_onto_q4_1_exactly(random_llama, tmp_path, symmetric):
    import gguf
    import torch

    from orstack.awq.grid import QuantSpec
    from orstack.awq.grid import quantize as rtn
    from orstack.awq.packed import write_packed
    from orstack.gguf import GgufConfig, convert
    from orstack.gguf.export import _permute_rotary

    model, tok = _load(random_llama)
    spec = QuantSpec(bits=4, group_size=64, symmetric=symmetric)
    quantized = {name: rtn(m.weight.data, spec) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    expected = {f"{name}.weight": q.dequantize(torch.float32).numpy() for name, q in quantized.items()}
    packed = tmp_path / "awq"
    write_packed(model, quantized, packed)
    tok.save_pretrained(packed)

    out = tmp_path / "awq.gguf"
    result = convert(str(packed), out, GgufConfig(type="q4_1", validate=False)).export
    mapped = [t for t in result.tensors if "AWQ" in t.note]
    assert len(mapped) == 2 * 7
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for hf_name, gg_name, n_heads in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 4),
                                      ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 2),
                                      ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", 0)]:
        want = expected[hf_name]
        if n_heads:
            want = _permute_rotary(want, n_heads)
        got = gguf.quants.dequantize(np.asarray(tensors[gg_name].data), gguf.GGMLQuantizationType.Q4_1)
        got = got.reshape(want.shape)
        # exact up to the fp16 rounding of each block's d and m
        scale = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True)
        err = np.abs(got - want).reshape(want.shape[0], -1, 32) / np.maximum(scale, 1e-12)
        assert err.max() < 4e-3, hf_name
        requantized = gguf.quants.dequantize(gguf.quants.quantize(want, gguf.GGMLQuantizationType.Q4_1),
                                             gguf.GGMLQuantizationType.Q4_1)
        assert np.abs(got - want).max() <= np.abs(requantized - want).max()
    llm = _llama(out)
    assert llm.tokenize(b"abc", add_bos=False)
    llm.close()


def test_vocab_trimmed_checkpoint_converts_and_tokenizes_identically(random_llama, sample_text_file, tmp_path):
    trimmed = tmp_path / "trimmed"
    r = subprocess.run([sys.executable, "-m", "orstack", "vocab-trim", str(random_llama), "--corpus",
                        str(sample_text_file), "--coverage", "0.9", "-o", str(trimmed), "--force"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, tok = _load(trimmed)
    assert len(tok) < 300
    out = tmp_path / "trimmed.gguf"
    export_gguf(model, tok, out, "f32", progress=False)
    diff, agree = _logits_vs_transformers(model, tok, out)
    assert diff < 1e-4 and agree == 1.0
    _tokenizer_agrees(tok, out)


@pytest.mark.parametrize("qtype", ["q4_k_m", "q5_k_m"])
def test_mixes_are_byte_identical_to_llama_cpps_own_quantizer(random_llama, tmp_path, qtype):
    # llama.cpp's quantizer (the library behind llama-quantize) run on our f32 export must choose the
    # same type for every tensor and write the same bytes as our own mix.
    import gguf

    from orstack.gguf.validate import llama_cpp_quantize

    model, tok = _load(random_llama)
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export_gguf(model, tok, f32, "f32", progress=False)
    export_gguf(model, tok, ours, qtype, progress=False)
    assert llama_cpp_quantize(f32, theirs, qtype) == qtype.upper()
    ours_t = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    theirs_t = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert {n: t.tensor_type.name for n, t in ours_t.items()} == {n: t.tensor_type.name for n, t in theirs_t.items()}
    assert "Q6_K" in {t.tensor_type.name for t in ours_t.values()}
    for name, tensor in ours_t.items():
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs_t[name].data)), name
