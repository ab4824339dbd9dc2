"""orstack gguf: GGUF export checked in llama.cpp, K-quants against ggml's reference."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_orstack

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

def _cpu():
    from orstack.runtime import Runtime

    return Runtime(device="cpu")


def _data_section(path) -> bytes:
    import gguf

    offset = gguf.GGUFReader(str(path)).data_offset
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def _one_line(r) -> None:
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_validates_tiny_trained_and_writes(tiny_trained, tmp_path):
    out = tmp_path / "tiny.gguf"
    tasks = tiny_trained.tasks
    r = run_orstack("gguf", tiny_trained.model, "-o", out, "--type", "f16", "--prompts", tasks / "heldout.jsonl",
                    "--text", tasks / "heldout.txt", "--tokens", "40")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "greedy agreement" in r.stderr and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no temporary sibling left


def test_gguf_carries_the_manifest_and_the_config_loads_back(random_llama, tmp_path):
    import gguf

    from orstack.gguf import GgufConfig, run
    from orstack.gguf.metadata import MANIFEST_KEY, read_gguf_manifest
    from orstack.io.manifest import config_from_args, config_from_manifest

    config = GgufConfig(type="f32", validate=True, n_tokens=8, max_length=64)
    out = tmp_path / "m.gguf"
    result = run(str(random_llama), out, config, _cpu())
    manifest = read_gguf_manifest(out)
    assert manifest == result.manifest
    assert manifest["stage"] == "gguf" and manifest["parent"]["path"] == str(random_llama)
    assert config_from_args(GgufConfig, manifest["args"]) == config == config_from_manifest(manifest)
    assert manifest["metrics"] == result.validation.as_dict() and manifest["metrics"]["passed"] is True
    assert result.export.size_bytes == out.stat().st_size
    # The manifest is the last metadata key; the tensors are exactly what the exporter writes.
    fields = gguf.GGUFReader(str(out)).fields
    assert list(fields)[-1] == MANIFEST_KEY
    # the header walk that skips arrays reads the same scalars and strings as gguf's reader
    from orstack.io.gguf_file import read_gguf_values

    wanted = {"general.architecture", "llama.context_length", "llama.rope.freq_base", "tokenizer.ggml.model",
              "tokenizer.ggml.bos_token_id", MANIFEST_KEY}
    assert read_gguf_values(out, wanted | {"no.such.key"}) == {k: fields[k].contents() for k in wanted}
    model, tok = _load(random_llama)
    plain = tmp_path / "plain.gguf"
    export_gguf(model, tok, plain, "f32", progress=False)
    assert _data_section(out) == _data_section(plain)
    # llama.cpp reads the file with the key (bench and route open it)
    from orstack.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(out))
    try:
        assert backend.llm.metadata[MANIFEST_KEY] == json.dumps(manifest, ensure_ascii=False)
    finally:
        backend.close()


def test_without_validation_the_manifest_has_no_metrics(random_llama, tmp_path):
    from orstack.gguf import GgufConfig, run
    from orstack.gguf.metadata import read_gguf_manifest

    out = tmp_path / "q8.gguf"
    config = GgufConfig(type="Q8_0", validate=False)
    run(str(random_llama), out, config, _cpu())
    manifest = read_gguf_manifest(out)
    assert manifest["args"]["type"] == "q8_0" and manifest["args"]["validate"] is False
    assert manifest["metrics"] == {}


def test_cli_defaults_are_the_config_defaults():
    import dataclasses

    import typer

    from orstack.commands.gguf import gguf as command
    from orstack.gguf import GgufConfig

    app = typer.Typer()
    app.command()(command)
    params = {p.name: p for p in typer.main.get_command(app).params}
    names = {"qtype": "type", "validate": "validate", "prompts": "prompts", "text": "text", "tokens": "n_tokens",
             "max_length": "max_length", "force": "force", "min_agreement": "min_agreement",
             "max_ppl_change": "max_ppl_change", "imatrix": "imatrix"}
    fields = {f.name: f for f in dataclasses.fields(GgufConfig)}
    assert set(names.values()) == set(fields)
    for option, name in names.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        cli = params[option].default
        assert (list(cli or []) if params[option].multiple else cli) == default, option


def test_failed_gate_writes_nothing(random_llama, tmp_path, monkeypatch):
    from orstack.errors import GateFailed
    from orstack.gguf import GgufConfig, run, validate

    monkeypatch.setitem(validate.GATES, "q4_0", 1.01)  # an impossible gate
    out = tmp_path / "gated.gguf"
    with pytest.raises(GateFailed, match="nothing written"):
        run(str(random_llama), out, GgufConfig(type="q4_0", validate=True, n_tokens=8), _cpu())
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    _torch()
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path_factory.mktemp("gpt2") / "gpt2"
    config = GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=300, bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    return gpt2


BAD_CASES = {
    # case: (arguments after the model, text the one-line message must contain)
    "unsupported architecture": (("-o", "{out}"), "unsupported architecture 'gpt2'"),
    "unknown type": (("-o", "{out}", "--type", "q3_k"), "--type: unknown type 'q3_k'"),
    "missing model": (("-o", "{out}"), "{missing}: no such checkpoint"),
    "directory at -o": (("-o", "{dir}"), "{dir}: is a directory"),
    "missing parent of -o": (("-o", "{tmp}/nowhere/x.gguf"), "does not exist"),
    "-o on the source": (("-o", "{model}"), "would overwrite the input"),
    "prompt not a string": (("-o", "{out}", "--prompts", "{numbers}"), "{numbers}:2: field 'prompt' must be a string"),
    "missing prompts file": (("-o", "{out}", "--prompts", "{tmp}/none.jsonl"), "none.jsonl: no such file"),
    "missing text file": (("-o", "{out}", "--text", "{tmp}/none.txt"), "none.txt"),
    "no cuda": (("-o", "{out}"), "--device cuda: no CUDA device"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_exit_2_one_line_and_leave_files_alone(random_llama, gpt2_checkpoint, tmp_path, case):
    args, message = BAD_CASES[case]
    out, directory = tmp_path / "x.gguf", tmp_path / "outdir"
    out.write_bytes(b"an older file the run must not touch")
    directory.mkdir()
    (directory / "keep.txt").write_text("mine")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"prompt": "12+3="}\n{"prompt": 12}\n', encoding="utf-8")
    model = {"unsupported architecture": gpt2_checkpoint, "missing model": tmp_path / "missing"}.get(case, random_llama)
    names = {"out": out, "dir": directory, "tmp": tmp_path, "model": model, "numbers": numbers,
             "missing": tmp_path / "missing"}
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    device = ["--device", "cuda"] if case == "no cuda" else []
    r = run_orstack(*device, "gguf", model, *(a.format(**names) for a in args))
    assert r.returncode == 2, r.stderr
    _one_line(r)
    assert message.format(**names) in r.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_disk_full_is_one_line_and_leaves_the_old_output(random_llama, tmp_path, monkeypatch):
    import errno

    import gguf

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)  # the export writes tensor by tensor
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    r = run_orstack("--quiet", "gguf", random_llama, "-o", out, "--no-validate")
    assert r.returncode == 1
    _one_line(r)
    assert "no space left on device" in r.stderr
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# -- packed AWQ -> GGUF blocks ---------------------------------------------------------------

_PACKED: dict = {}


def _packed_awq(random_llama, tmp_path, symmetric, group=64):
    """An RTN 4-bit packed checkpoint of random_llama and its dequantized weights (built once per session)."""
    import torch

    from orstack.awq.grid import QuantSpec
    from orstack.awq.grid import quantize as rtn
    from orstack.awq.packed import write_packed

    if (symmetric, group) in _PACKED:
        return _PACKED[symmetric, group]
    model, tok = _load(random_llama)
    spec = QuantSpec(bits=4, group_size=group, symmetric=symmetric)
    quantized = {name: rtn(m.weight.data, spec) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    expected = {f"{name}.weight": q.dequantize(torch.float32).numpy() for name, q in quantized.items()}
    packed = random_llama.parent / f"awq-{symmetric}-{group}"
    write_packed(model, quantized, packed)
    tok.save_pretrained(packed)
    _PACKED[symmetric, group] = packed, expected
    return packed, expected


AWQ_CHECKED = [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 4),
               ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 2),
               ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", 0)]


def _gguf_weights(path, names):
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for gg_name in names:
        t = tensors[gg_name]
        out[gg_name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return out


@pytest.mark.parametrize(("qtype", "symmetric"), [("q4_1", False), ("q4_0", True), ("q8_0", False)])
def test_packed_awq_maps_exactly_onto_legacy_blocks(random_llama, tmp_path, qtype, symmetric):
    import gguf

    from orstack.gguf import GgufConfig, run
    from orstack.gguf.export import _permute_rotary

    packed, expected = _packed_awq(random_llama, tmp_path, symmetric)
    out = tmp_path / "awq.gguf"
    result = run(str(packed), out, GgufConfig(type=qtype, validate=False), _cpu()).export
    assert len([t for t in result.tensors if "mapped exactly" in t.note]) == 2 * 7
    got_all = _gguf_weights(out, [g for _, g, _ in AWQ_CHECKED])
    ggml_type = gguf.GGMLQuantizationType[qtype.upper()]
    for hf_name, gg_name, n_heads in AWQ_CHECKED:
        want = expected[hf_name]
        if n_heads:
            want = _permute_rotary(want, n_heads)
        got = got_all[gg_name].reshape(want.shape)
        # exact up to the fp16 rounding of each block's d (and m)
        scale = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True)
        err = np.abs(got - want).reshape(want.shape[0], -1, 32) / np.maximum(scale, 1e-12)
        assert err.max() < 4e-3, hf_name
        requantized = gguf.quants.dequantize(gguf.quants.quantize(want, ggml_type), ggml_type)
        assert np.abs(got - want).max() <= np.abs(requantized - want).max()
    llm = _llama(out)
    assert llm.tokenize(b"abc", add_bos=False)
    llm.close()


def test_asymmetric_awq_does_not_pretend_to_fit_q4_0(random_llama, tmp_path):
    from orstack.gguf import GgufConfig, run

    packed, _ = _packed_awq(random_llama, tmp_path, symmetric=False)
    result = run(str(packed), tmp_path / "q4_0.gguf", GgufConfig(type="q4_0", validate=False), _cpu()).export
    linear = [t for t in result.tensors if t.name.startswith("blk.") and t.ggml_type == "Q4_0"]
    assert linear and all("do not map onto Q4_0: requantized" in t.note for t in linear)


def test_packed_awq_carried_into_k_quants(random_llama, tmp_path):
    """Mapped AWQ groups reproduce the AWQ weights better than the type's own search on the
    dequantized weights; 'best' per super-block is never worse than either; the file loads."""
    import gguf

    from orstack.gguf.awq import carry, read_awq
    from orstack.gguf.export import export_gguf, quantize
    from orstack.io.checkpoint import load_model

    packed, expected = _packed_awq(random_llama, tmp_path, symmetric=False)
    awq = read_awq(packed)
    for ggml_type in ("Q4_K", "Q5_K", "Q6_K"):
        errors = dict.fromkeys(("map", "requantize", "best"), 0.0)
        for hf_name, _, _ in AWQ_CHECKED:
            want = expected[hf_name]
            for mode in errors:
                carried = carry(awq[hf_name], ggml_type, want, None, mode)
                blocks = quantize(want, ggml_type) if mode == "requantize" else carried[0]
                assert (carried is None) == (mode == "requantize")
                got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]).reshape(want.shape)
                errors[mode] += float(((got - want) ** 2).sum())
        assert errors["best"] <= min(errors["map"], errors["requantize"]) * (1 + 1e-6), (ggml_type, errors)
        assert errors["map"] < errors["requantize"], (ggml_type, errors)
    model, tok = load_model(str(packed))
    out = tmp_path / "q4_k.gguf"
    result = export_gguf(model, tok, out, "q4_k", progress=False, awq=awq)
    notes = [t.note for t in result.tensors if t.name.startswith("blk.") and t.ggml_type == "Q4_K"]
    assert len(notes) == 2 * 7 and all("super-blocks" in n for n in notes), notes
    llm = _llama(out)
    assert llm.tokenize(b"abc", add_bos=False)
    llm.close()


def test_vocab_trimmed_checkpoint_converts_and_tokenizes_identically(random_llama, sample_text_file, tmp_path):
    trimmed = tmp_path / "trimmed"
    r = run_orstack("vocab-trim", random_llama, "--corpus", sample_text_file, "--coverage", "0.9", "-o", trimmed,
                    "--force")
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
