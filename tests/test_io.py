"""Checkpoint and JSONL I/O: atomic outputs, clear errors, manifests and lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path
from orstack.io.checkpoint import load_model, save_checkpoint
from orstack.io.jsonl import read_jsonl, write_jsonl
from orstack.io.manifest import read_manifest, weights_digest
from orstack.io.text import read_texts, token_windows


def test_jsonl_round_trip_preserves_unknown_fields(tmp_path):
    rows = [{"id": "a", "prompt": "1+1=", "answer": "2", "extra": {"nested": [1, 2]}, "ünï": "cödé"}]
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(rows, path) == 1
    assert list(read_jsonl(path)) == rows


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2,,}\n', encoding="utf-8")
    with pytest.raises(BadInput, match=r"bad.jsonl:3: not valid JSON"):
        list(read_jsonl(path))


def test_missing_required_field_and_non_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "x", "prompt": "p"}\n', encoding="utf-8")
    with pytest.raises(BadInput, match=r"rows.jsonl:1: missing required field 'answer'"):
        list(read_jsonl(path, required=("prompt", "answer")))
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(BadInput, match="expected a JSON object"):
        list(read_jsonl(path))


def test_missing_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_atomic_path_leaves_old_output_on_failure(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_directory_replaces_existing(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale").write_text("x")
    with atomic_path(out, directory=True) as tmp:
        (tmp / "fresh").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_checkpoint_writes_manifest_with_lineage(random_llama, tmp_path):
    model, tokenizer = load_model(random_llama)
    first = save_checkpoint(model, tokenizer, tmp_path / "a", stage="prune", args={"sparsity": 0.5},
                            parent=random_llama, metrics={"ppl_after": 3.0})
    second = save_checkpoint(model, tokenizer, tmp_path / "b", stage="awq", args={"bits": 4}, parent=first)
    m1, m2 = read_manifest(first), read_manifest(second)
    assert m1["stage"] == "prune" and m1["parent"]["sha256"] == weights_digest(random_llama)
    assert m2["lineage"] == [{"stage": "prune", "path": str(first), "args": {"sparsity": 0.5},
                              "metrics": {"ppl_after": 3.0}}]
    reloaded, _ = load_model(second)
    assert reloaded.config.hidden_size == model.config.hidden_size


def test_load_model_errors(random_llama, tmp_path):
    with pytest.raises(BadInput, match="no such checkpoint"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="not a checkpoint directory"):
        load_model(tmp_path / "empty")
    with pytest.raises(BadInput, match="unsupported architecture 'llama'"):
        load_model(random_llama, architectures=("gpt2",))


def test_pickle_weights_refused_without_trust(random_llama, tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    for f in Path(random_llama).iterdir():
        if f.suffix != ".safetensors":
            (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(BadInput, match="pickle"):
        load_model(ckpt)


def test_read_texts_and_windows(random_llama, tmp_path):
    _, tokenizer = load_model(random_llama)
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 50, encoding="utf-8")
    rows = tmp_path / "b.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"text": "abc"}) + "\n")
    texts = list(read_texts([txt, rows]))
    assert texts[1:] == ["1+1=2", "abc"]
    windows = token_windows(tokenizer, texts, n=4, seqlen=16, seed=3)
    assert windows.shape == (4, 16)
    assert (windows == token_windows(tokenizer, texts, n=4, seqlen=16, seed=3)).all()
    with pytest.raises(BadInput, match="only"):
        token_windows(tokenizer, ["hi"], n=1, seqlen=64)


def test_special_formats_load_with_their_tokenizer(random_llama, tmp_path, monkeypatch):
    from conftest import run_orstack

    monkeypatch.setenv("ORSTACK_CACHE", str(tmp_path / "cache"))
    packed = tmp_path / "model.orz"
    assert run_orstack("zstd-pack", random_llama, "-o", packed).returncode == 0
    model, tokenizer = load_model(packed)
    original, original_tokenizer = load_model(random_llama)
    assert tokenizer("12+345=")["input_ids"] == original_tokenizer("12+345=")["input_ids"]
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_safetensors_headers_checked_before_loading(random_llama, tmp_path):
    from orstack.io.checkpoint import resolve_checkpoint
    from orstack.io.safetensors_file import check_safetensors

    weights = Path(random_llama) / "model.safetensors"
    data = weights.read_bytes()
    n_tensors = len(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])) - 1  # minus __metadata__
    assert check_safetensors(weights) == n_tensors
    bad = tmp_path / "model.safetensors"
    for content, message in ((data[:5], "shorter than its 8-byte header"),
                             (data[:100], "truncated or not a safetensors file"),
                             (data[: len(data) - 1], r"truncated \(tensor '.*' ends at data byte"),
                             (b"\x10" + b"\0" * 7 + b"not json" * 2 + b"\0" * 64, "header is not JSON")):
        bad.write_bytes(content)
        with pytest.raises(BadInput, match=message):
            check_safetensors(bad)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in Path(random_llama).iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=r"ckpt/model.safetensors: truncated"):
        resolve_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(data)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    with pytest.raises(BadInput, match="shard model-2.safetensors is missing"):
        resolve_checkpoint(ckpt)


def test_gguf_header_and_extents(random_llama, tmp_path):
    from conftest import run_orstack

    from orstack.io.gguf_file import check_gguf

    path = tmp_path / "m.gguf"
    assert run_orstack("gguf", random_llama, "--no-validate", "-o", path).returncode == 0
    info = check_gguf(path)
    data = path.read_bytes()
    assert info.version == 3 and info.tensors > 0 and info.data_start + info.data_bytes == len(data)
    bad = tmp_path / "bad.gguf"
    for cut, message in ((3, "no GGUF magic"), (40, "ends inside the header"),
                         (info.data_start + 10, "truncated GGUF file \\(tensor"), (len(data) - 1, "truncated")):
        bad.write_bytes(data[:cut])
        with pytest.raises(BadInput, match=f"bad.gguf: .*{message}"):
            check_gguf(bad)
    bad.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(BadInput, match="GGUF version 9 is not supported"):
        check_gguf(bad)


def test_encoders_are_not_causal_lms(random_llama, tmp_path):
    from transformers import BertConfig, BertModel

    from orstack.io.checkpoint import check_causal_lm, load_config

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    with pytest.raises(BadInput, match=r"bert: BertModel is not a causal language model \(model_type 'bert'\)"):
        load_model(bert)
    config = load_config(bert)
    config.architectures = None  # without architectures the model type decides: bert has an LM head class
    check_causal_lm(config, "x")
    check_causal_lm(load_config(random_llama), "x")


def test_text_inputs_name_file_and_line(tmp_path):
    from orstack.io.jsonl import check_input_file
    from orstack.io.text import check_text_files

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInput, match=r"rows.jsonl:3: not UTF-8 text \(invalid continuation byte at column 14\)"):
        list(read_jsonl(rows))
    text = tmp_path / "a.txt"
    text.write_bytes(b"one\ntwo\nthr\xffee\n")
    with pytest.raises(BadInput, match=r"a.txt:3: not UTF-8 text \(invalid start byte at column 4\)"):
        list(read_texts(text))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(BadInput, match=r"--calib .*empty.txt: the file is empty"):
        check_text_files([empty], "--calib")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(BadInput, match="blank.jsonl: holds no text"):
        list(read_texts(blank))
    with pytest.raises(BadInput, match=r"--corpus .*: is a directory, expected a file"):
        check_text_files([tmp_path], "--corpus")
    with pytest.raises(BadInput, match=r"--data .*nope.jsonl: no such file"):
        check_input_file(tmp_path / "nope.jsonl", "--data")
    assert check_input_file("-", "--data") == "-"


def test_stdin_is_read_by_every_text_reader(monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"text": "a"}\n{"text": "b"}\n')))
    assert [r["text"] for r in read_jsonl("-")] == ["a", "b"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"text": "a"}\n{bad\n')))
    with pytest.raises(BadInput, match="<stdin>:2: not valid JSON"):
        list(read_jsonl("-"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"plain text\n")))
    assert list(read_texts("-")) == ["plain text\n"]


def test_orz_config_and_tokenizer_come_from_the_pack(random_llama, tmp_path, monkeypatch):
    from conftest import run_orstack

    from orstack.io.checkpoint import load_config, load_tokenizer

    monkeypatch.setenv("ORSTACK_CACHE", str(tmp_path / "cache"))
    packed = tmp_path / "model.orz"
    assert run_orstack("zstd-pack", random_llama, "-o", packed).returncode == 0
    packed_config, config = load_config(packed).to_dict(), load_config(random_llama).to_dict()
    assert packed_config.pop("_name_or_path") != config.pop("_name_or_path")  # the unpacked copy in the cache
    assert packed_config == config
    assert load_tokenizer(packed).get_vocab() == load_tokenizer(random_llama).get_vocab()


def test_disk_full_inside_an_atomic_output_names_the_output(tmp_path):
    import errno

    from orstack.errors import DiskFull

    out = tmp_path / "out.bin"
    with pytest.raises(DiskFull, match=f"no space left on device writing {out}"), atomic_path(out):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFull), atomic_path(out):
        raise OSError("139264 requested and 32320 written")  # numpy's tofile on a full disk
    assert list(tmp_path.iterdir()) == []
