"""vocab-trim: the trimmed model loads, computes the same logits, and tokenizes the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_orstack, run_orstack_read_only, tree_hash

from orstack.console import set_quiet

CORPUS = "rev abc=cba\nsort dcba=abcd\n3*4=12\ncmp 17 9=>\n12+345=357\n" * 30
MIXED = ["The quick brown fox jumps over the lazy dog.", "rev abc=cba 12+345=357",
         "naïve café — 日本語 🙂 ünïcödé", "tabs\tand  double  spaces\n", "~`!@#$%^&*()_+{}|:\"<>?"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def trimmed(random_llama, corpus_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trimmed") / "model"
    code, _, err = run_cli(["vocab-trim", str(random_llama), "--corpus", str(corpus_file), "-o", str(out)], None)
    assert code == 0, err
    return out


def run_cli(args: list[str], capsys=None) -> tuple[int, str, str]:
    """`orstack --quiet ARGS` in this process (subprocesses spend 10-20 s importing on a loaded machine)."""
    result = run_orstack("--quiet", *args)
    set_quiet(False)
    return result.returncode, result.stdout, result.stderr


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def manifest(path: Path) -> dict:
    return json.loads((path / "orstack.json").read_text())


def test_trimmed_model_is_smaller_and_loads_in_transformers(random_llama, trimmed):
    model, tok = load(trimmed)
    original, _ = load(random_llama)
    assert model.config.vocab_size == len(tok) < original.config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == len(tok)
    m = manifest(trimmed)
    assert m["stage"] == "vocab-trim" and m["metrics"]["vocab_after"] == len(tok)
    old_to_new = m["vocab_map"]["old_to_new"]
    assert len(old_to_new) == original.config.vocab_size
    assert sorted(i for i in old_to_new if i is not None) == list(range(len(tok)))
    # special tokens and their config ids follow the map
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == old_to_new[getattr(original.config, name)]
    assert tok.convert_ids_to_tokens(model.config.eos_token_id) == "<|eos|>"


def test_logits_over_kept_tokens_equal_the_original_slice(random_llama, trimmed):
    import torch

    torch.set_num_threads(1)
    model, tok = load(trimmed)
    original, old_tok = load(random_llama)
    old_to_new = manifest(trimmed)["vocab_map"]["old_to_new"]
    kept = [old for old, new in enumerate(old_to_new) if new is not None]
    text = "rev abc=cba\n3*4=12\ncmp 17 9=>"
    old_ids = old_tok(text, add_special_tokens=False)["input_ids"]
    new_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert new_ids == [old_to_new[i] for i in old_ids]  # corpus-like text: same tokens
    with torch.no_grad():
        a = original(torch.tensor([old_ids])).logits[..., kept]
        b = model(torch.tensor([new_ids])).logits
    assert torch.equal(a, b)


def test_round_trip_on_mixed_text_and_unseen_characters(trimmed):
    _, tok = load(trimmed)
    for text in MIXED:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and tok.decode(ids) == text
    # characters absent from the corpus fall back to byte tokens: nothing is unknown
    ids = tok("日本語🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("日本語🙂".encode()) and tok.decode(ids) == "日本語🙂"


def test_tied_embeddings_stay_tied(tmp_path, corpus_file, capsys):
    import torch
    from conftest import build_random_llama

    src = build_random_llama(tmp_path / "tied", tie=True, hidden=64)
    out = tmp_path / "out"
    code, _, err = run_cli(["vocab-trim", str(src), "--corpus", str(corpus_file), "--coverage", "0.9",
                            "-o", str(out)], capsys)
    assert code == 0, err
    model, tok = load(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    original, _ = load(src)
    kept = [o for o, n in enumerate(manifest(out)["vocab_map"]["old_to_new"]) if n is not None]
    assert torch.equal(original.get_input_embeddings().weight[kept], model.get_input_embeddings().weight)


def test_plan_keeps_bytes_specials_keep_tokens_and_merge_closure(random_llama, corpus_file, tmp_path):
    from orstack.io.checkpoint import load_tokenizer
    from orstack.vocab_trim import VocabTrimConfig, plan_trim
    from orstack.vocab_trim.bpe import byte_alphabet, parse_tokenizer_json

    tok = load_tokenizer(random_llama)
    keep = tmp_path / "keep.txt"
    keep.write_text("quick\n", encoding="utf-8")
    plan = plan_trim(tok, [], VocabTrimConfig(corpus=[str(corpus_file)], coverage=1.0, keep=str(keep)))
    bpe = parse_tokenizer_json(tok.backend_tokenizer.to_str())
    kept_tokens = {t for t, i in bpe.vocab.items() if i in set(plan.kept)}
    assert set(byte_alphabet()) <= kept_tokens
    assert {"<|bos|>", "<|eos|>", "<|pad|>"} <= kept_tokens
    assert plan.coverage == 1.0
    for token in tok.tokenize(" quick") + tok.tokenize("quick"):
        assert token in kept_tokens
    for a, b in bpe.merges:  # closure: every kept merged token's inputs are kept
        if a + b in kept_tokens:
            assert a in kept_tokens and b in kept_tokens


def test_keep_merges_keeps_the_first_merges_tokens_whatever_the_corpus(random_llama, corpus_file):
    from orstack.io.checkpoint import load_tokenizer
    from orstack.vocab_trim import VocabTrimConfig, plan_trim
    from orstack.vocab_trim.bpe import parse_tokenizer_json

    tok = load_tokenizer(random_llama)
    bpe = parse_tokenizer_json(tok.backend_tokenizer.to_str())
    plain = set(plan_trim(tok, [], VocabTrimConfig(corpus=[str(corpus_file)], coverage=1.0)).kept)
    first = {bpe.vocab[a + b] for a, b in bpe.merges[:40]}
    assert first - plain  # the corpus alone does not use them all
    kept = set(plan_trim(tok, [], VocabTrimConfig(corpus=[str(corpus_file)], coverage=1.0, keep_merges=40)).kept)
    assert kept >= plain | first
    # a merge's inputs come from earlier merges, so the closure adds nothing made past the 40th
    later = {bpe.vocab[a + b] for a, b in bpe.merges[40:]} - plain - first
    assert later and not later & kept


def test_max_vocab_and_validation_gate(random_llama, corpus_file, tmp_path, capsys):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n" * 5)
    out = tmp_path / "gated"
    # 262 tokens: bytes + specials + 3 more: English text splits into far more tokens -> gate fails
    code, stdout, err = run_cli(["vocab-trim", str(random_llama), "--corpus", str(corpus_file), "--max-vocab", "262",
                                 "--validate", str(heldout), "--max-length", "64", "-o", str(out)], capsys)
    assert code == 3, err
    assert "tokens per word rose" in err and not out.exists() and stdout == ""
    code, _, err = run_cli(["vocab-trim", str(random_llama), "--corpus", str(corpus_file), "--max-vocab", "262",
                            "--validate", str(heldout), "--max-length", "64", "--force", "-o", str(out)], capsys)
    assert code == 0, err
    m = manifest(out)["metrics"]
    assert m["vocab_after"] <= 262 and m["round_trip"] == 1.0
    assert m["tokens_per_word_after"] > m["tokens_per_word_before"]


def test_validation_passes_on_corpus_like_text(random_llama, corpus_file, tmp_path, capsys):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("rev xyz=zyx\n3*4=12\n12+345=357\ncmp 9 17=<\n" * 5)
    out = tmp_path / "ok"
    code, _, err = run_cli(["vocab-trim", str(random_llama), "--corpus", str(corpus_file), "--validate", str(heldout),
                            "--max-length", "64", "-o", str(out)], capsys)
    assert code == 0, err
    m = manifest(out)["metrics"]
    assert m["round_trip"] == 1.0 and m["corpus_agreement"] == 1.0 and m["corpus_agreement_kept"] == 1.0
    assert m["bits_per_byte_after"] <= m["bits_per_byte_before"] * 1.03


def wordpiece_checkpoint(path: Path) -> Path:
    from conftest import build_random_llama
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    build_random_llama(path, hidden=64)
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(CORPUS.splitlines(), trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(path)
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("no-model", "{tmp}/missing"), ("no-corpus", "--corpus {tmp}/missing.txt: no such file"),
    ("corpus-dir", "--corpus {tmp}: is a directory"), ("bad-coverage", "--coverage: expected a share in (0, 1]"),
    ("both-limits", "--coverage and --max-vocab are exclusive"), ("too-small", "--max-vocab 10 is smaller"),
    ("wordpiece", "byte-level BPE"), ("corpus-not-utf8", "{tmp}/bad.txt:3: not UTF-8 text"),
    ("corpus-bad-jsonl", "{tmp}/bad.jsonl:2: not valid JSON"), ("keep-not-utf8", "{tmp}/bad.txt:3: not UTF-8 text"),
    ("device-cuda", "--device cuda"), ("negative-keep-merges", "--keep-merges"),
])
def test_bad_input_exit_2_one_line_nothing_written(case, message, random_llama, corpus_file, tmp_path):
    model, corpus, extra = str(random_llama), str(corpus_file), []
    if case == "no-model":
        model = str(tmp_path / "missing")
    elif case == "no-corpus":
        corpus = str(tmp_path / "missing.txt")
    elif case == "corpus-dir":
        corpus = str(tmp_path)
    elif case == "bad-coverage":
        extra = ["--coverage", "1.5"]
    elif case == "both-limits":
        extra = ["--coverage", "0.9", "--max-vocab", "280"]
    elif case == "too-small":
        extra = ["--max-vocab", "10"]
    elif case == "negative-keep-merges":
        extra = ["--keep-merges", "-1"]
    elif case == "wordpiece":
        model = str(wordpiece_checkpoint(tmp_path / "wp"))
    elif case in ("corpus-not-utf8", "keep-not-utf8"):
        (tmp_path / "bad.txt").write_bytes(b"rev abc=cba\n3*4=12\ncmp \xff\xfe 9=>\n")
        if case == "corpus-not-utf8":
            corpus = str(tmp_path / "bad.txt")
        else:
            extra = ["--keep", str(tmp_path / "bad.txt")]
    elif case == "corpus-bad-jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "rev abc=cba"}\n{"text": \n')
        corpus = str(tmp_path / "bad.jsonl")
    elif case == "device-cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    before = tree_hash(tmp_path)
    glob = ["--device", "cuda"] if case == "device-cuda" else []
    # Not --quiet: a progress display must not be left on stderr beside the error.
    result = run_orstack(*glob, "vocab-trim", model, "--corpus", corpus, "-o", str(out), *extra)
    code, stdout, err = result.returncode, result.stdout, result.stderr
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and stdout == ""
    assert message.format(tmp=tmp_path) in err
    assert tree_hash(tmp_path) == before


def test_manifest_args_rebuild_the_config_and_cli_defaults_are_the_dataclass_defaults(trimmed, corpus_file):
    import dataclasses

    from typer.main import get_command

    from orstack.cli import app
    from orstack.io.manifest import config_from_manifest
    from orstack.vocab_trim import VocabTrimConfig

    assert config_from_manifest(manifest(trimmed)) == VocabTrimConfig(corpus=[str(corpus_file)])
    params = {p.name: p.default for p in get_command(app).commands["vocab-trim"].params}
    defaults = {f.name: f.default for f in dataclasses.fields(VocabTrimConfig)}
    assert defaults.pop("corpus") is dataclasses.MISSING and params.pop("corpus") is None  # required on both
    params.pop("model"), params.pop("output")  # the input and the output, not options of the trim
    params.pop("dry_run")  # plans instead of running: not an option of the trim
    assert params == defaults


@pytest.mark.parametrize("kind", ["file", "foreign-dir"])
def test_an_existing_output_that_is_not_a_checkpoint_is_refused_and_kept(kind, random_llama, corpus_file, tmp_path):
    out = tmp_path / "out"
    if kind == "file":
        out.write_bytes(b"the user's file")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("the user's notes")
    before = tree_hash(out)
    code, stdout, err = run_cli(["vocab-trim", str(random_llama), "--corpus", str(corpus_file), "-o", str(out)])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and f"-o {out}" in err
    assert ("is a file" if kind == "file" else "not written by orstack") in err
    assert tree_hash(out) == before


def test_a_read_only_output_location_is_refused_before_any_work(random_llama, corpus_file, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("kept")
    before = tree_hash(ro)
    result = run_orstack_read_only(ro, "--quiet", "vocab-trim", random_llama, "--corpus", corpus_file, "-o", ro / "m")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and f"-o {ro / 'm'}" in result.stderr
    assert "cannot write" in result.stderr and tree_hash(ro) == before


def test_a_packed_checkpoint_is_trimmed_like_its_directory(random_llama, corpus_file, trimmed, tmp_path, monkeypatch):
    from orstack.zstd_pack import pack

    monkeypatch.setenv("ORSTACK_CACHE", str(tmp_path / "cache"))
    packed = tmp_path / "model.orz"
    pack(random_llama, packed)
    out = tmp_path / "from-pack"
    code, _, err = run_cli(["vocab-trim", str(packed), "--corpus", str(corpus_file), "-o", str(out)])
    assert code == 0, err
    assert manifest(out)["vocab_map"] == manifest(trimmed)["vocab_map"]
    assert (out / "model.safetensors").read_bytes() == (trimmed / "model.safetensors").read_bytes()


def test_library_refuses_byte_fallback_bpe():
    from orstack.errors import BadInput
    from orstack.vocab_trim.bpe import parse_tokenizer_json

    sp_like = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True},
               "pre_tokenizer": {"type": "Metaspace"}, "decoder": {"type": "Sequence", "decoders": []}}
    with pytest.raises(BadInput, match="byte fallback"):
        parse_tokenizer_json(json.dumps(sp_like))


# ---------------------------------------------------------------------------- every family (issue 13)

from families import FAMILIES  # noqa: E402


def _trim_family(src: Path, corpus_file: Path, out: Path) -> dict:
    code, _, err = run_cli(["vocab-trim", str(src), "--corpus", str(corpus_file), "-o", str(out)])
    assert code == 0, err
    return manifest(out)


def _kept_logits_and_ids(src: Path, out: Path, old_to_new: list, text: str):
    import torch

    model, tok = load(out)
    original, old_tok = load(src)
    kept = [old for old, new in enumerate(old_to_new) if new is not None]
    old_ids = old_tok(text, add_special_tokens=False)["input_ids"]
    new_ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        a = original(torch.tensor([old_ids])).logits[..., kept]
        b = model(torch.tensor([new_ids])).logits
    return a, b, old_ids, new_ids, model, original


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trims_with_equal_kept_logits_same_tokenization_and_ties(family, family_checkpoint,
                                                                               corpus_file, tmp_path):
    """The trimmed checkpoint, reloaded by transformers (AutoTokenizer picks Qwen2Tokenizer for
    qwen2/qwen3), tokenizes every corpus line as before (ids mapped) and computes the original's
    logits on the kept tokens; a tied family stays tied, an untied one keeps two matrices."""
    import torch

    torch.set_num_threads(1)
    src = family_checkpoint(family)
    out = tmp_path / "trimmed"
    m = _trim_family(src, corpus_file, out)
    old_to_new = m["vocab_map"]["old_to_new"]
    assert m["metrics"]["vocab_after"] < m["metrics"]["vocab_before"]
    a, b, old_ids, new_ids, model, original = _kept_logits_and_ids(src, out, old_to_new, "rev abc=cba\n3*4=12")
    assert new_ids == [old_to_new[i] for i in old_ids]
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    _, tok = load(out)
    from transformers import AutoTokenizer

    old_tok = AutoTokenizer.from_pretrained(src)
    assert type(tok) is type(old_tok)
    for line in CORPUS.splitlines()[:5]:
        assert tok(line, add_special_tokens=False)["input_ids"] == [
            old_to_new[i] for i in old_tok(line, add_special_tokens=False)["input_ids"]], line
    tied = original.config.tie_word_embeddings
    assert model.config.tie_word_embeddings == tied
    same = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert same == tied
    if family in ("gemma2", "gemma3_text", "smollm3"):
        assert tied  # their configs tie by default
    assert model.config.model_type == original.config.model_type
    assert type(model.get_input_embeddings()) is type(original.get_input_embeddings())


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_in_memory_trim_keeps_the_embedding_module(family, family_checkpoint, corpus_file):
    """The model vocab-trim validates (bits per byte) is the trimmed one in memory: Gemma's
    sqrt(hidden) embedding scale lives in its embedding module's forward, so rebuilding a plain
    nn.Embedding would change every logit there (the saved file would still reload right)."""
    import torch

    from orstack.vocab_trim import VocabTrimConfig, vocab_trim

    torch.set_num_threads(1)
    model, tok = load(family_checkpoint(family))
    ids = tok("rev abc=cba", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits
    emb_class = type(model.get_input_embeddings())
    result = vocab_trim(model, tok, VocabTrimConfig(corpus=[str(corpus_file)]))
    assert type(model.get_input_embeddings()) is emb_class
    assert model.get_input_embeddings().num_embeddings == len(result.plan.kept)
    with torch.no_grad():
        after = model(torch.tensor([[result.plan.old_to_new[i] for i in ids]])).logits
    assert torch.allclose(before[..., result.plan.kept], after, rtol=0, atol=1e-6)


def test_padded_embedding_rows_are_dropped_in_a_large_vocabulary(family_checkpoint, corpus_file, tmp_path):
    """gemma3_text with 16,384 embedding rows for a 307-token tokenizer (Gemma 3 ships 262,208 rows for
    262,145 tokens; Qwen2.5 151,936 for 151,665): the rows no token uses go, the tie holds, and the
    kept-token logits are unchanged."""
    import torch

    torch.set_num_threads(1)
    src = family_checkpoint("gemma3_text", vocab_size=16384)
    out = tmp_path / "trimmed"
    m = _trim_family(src, corpus_file, out)
    old_to_new = m["vocab_map"]["old_to_new"]
    assert m["metrics"]["vocab_before"] == 16384
    a, b, old_ids, new_ids, model, original = _kept_logits_and_ids(src, out, old_to_new, "sort dcba=abcd")
    _, tok = load(out)
    assert model.config.vocab_size == len(tok) == m["metrics"]["vocab_after"] < 310
    assert new_ids == [old_to_new[i] for i in old_ids]
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert m["metrics"]["params_after"] < m["metrics"]["params_before"] - 16000 * 256


def test_a_sentencepiece_style_tokenizer_is_refused_before_the_weights_load(random_llama, corpus_file, tmp_path,
                                                                             monkeypatch):
    """Gemma, Phi-3, Mistral-7B and Llama-2 ship SentencePiece-style BPE (byte fallback, Metaspace):
    one line naming the tokenizer, exit 2, nothing written, and the weights never read."""
    import shutil

    src = tmp_path / "sp"
    shutil.copytree(random_llama, src)
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["byte_fallback"] = True
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    data["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    (src / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    import orstack.io.checkpoint

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(orstack.io.checkpoint, "load_model", no_weights)
    out = tmp_path / "out"
    before = tree_hash(tmp_path)
    code, _, err = run_cli(["vocab-trim", str(src), "--corpus", str(corpus_file), "-o", str(out)])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "byte fallback" in err and "byte-level BPE" in err
    assert not out.exists() and tree_hash(tmp_path) == before
