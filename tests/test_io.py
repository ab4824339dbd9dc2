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
