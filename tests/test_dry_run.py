"""`--dry-run` on prune, awq, gguf and vocab-trim (orstack/plan.py): the per-tensor plan from the
config and the safetensors headers, no tensor data read, nothing written; exit 2 with the reason
when the stage would refuse."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from conftest import run_orstack, tree_hash


def _synthetic_checkpoint(path: Path, **config) -> Path:
    """A Llama checkpoint whose model.safetensors declares every tensor (bf16) in a complete
    header, its data a hole: a sparse file of the full size that takes no disk."""
    from transformers import LlamaConfig

    from orstack.architectures import weightless_model
    from orstack.plan import meta_tensors

    cfg = LlamaConfig(**config, torch_dtype="bfloat16")
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    header, offset = {}, 0
    for name, shape in meta_tensors(weightless_model(cfg)).items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with (path / "model.safetensors").open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


@pytest.fixture(scope="module")
def llama_7b_header(tmp_path_factory) -> Path:
    """Llama-7B's shapes: 13.5 GB of declared bf16 weights."""
    return _synthetic_checkpoint(tmp_path_factory.mktemp("big") / "llama-7b", hidden_size=4096,
                                 intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)


def _read_bytes() -> int:
    """Bytes this process has read through read(2) so far (/proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _plan_rows(stdout: str) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return [r["tensor"] for r in rows if "tensor" in r], rows[-1]["plan"]


STAGES = {
    "prune": ("prune", "{model}", "--calib", "{calib}", "--pattern", "2:4", "-o", "{out}", "--dry-run"),
    "awq": ("awq", "{model}", "--calib", "{calib}", "--group-size", "128", "-o", "{out}", "--dry-run"),
    "gguf": ("gguf", "{model}", "--type", "q4_k_m", "-o", "{out}.gguf", "--dry-run"),
}


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dry_run_of_a_13_gb_checkpoint_reads_headers_only(stage, llama_7b_header, sample_text_file, tmp_path):
    size = (llama_7b_header / "model.safetensors").stat().st_size
    assert size > 13e9
    args = [a.format(model=llama_7b_header, calib=sample_text_file, out=tmp_path / "out") for a in STAGES[stage]]
    run_orstack(*args)  # imports and caches warmed: the second run is the measured one
    before, start = _read_bytes(), time.perf_counter()
    r = run_orstack(*args)
    seconds, read = time.perf_counter() - start, _read_bytes() - before
    assert r.returncode == 0, r.stderr
    assert read < 20e6, f"{stage} --dry-run read {read / 1e6:.0f} MB of a {size / 1e9:.1f} GB checkpoint"
    assert seconds < 30, seconds  # a couple of seconds idle; generous for a loaded CI machine
    assert list(tmp_path.iterdir()) == []  # nothing written
    tensors, plan = _plan_rows(r.stdout)
    assert plan["ok"] and plan["bytes_in"] == sum(
        v["data_offsets"][1] - v["data_offsets"][0] for k, v in _header(llama_7b_header).items())
    assert len(tensors) == 32 * 9 + 3 and "nothing written (--dry-run)" in r.stderr
    by_name = {t["name"]: t for t in tensors}
    if stage == "prune":
        q = by_name["model.layers.0.self_attn.q_proj.weight"]
        # 2:4 keeps half the values plus a 1-bit mask; prune computes and stores in --dtype float32
        assert q["action"] == "prune 2:4" and q["bits_per_weight"] == pytest.approx(17.0)
        assert "--dtype float32: values stored in 4 bytes" in r.stderr
    elif stage == "awq":
        q = by_name["model.layers.0.self_attn.q_proj.weight"]
        # 4-bit codes + an fp32 scale and a 4-bit zero point per 128 weights
        assert q["action"] == "int4 g128" and q["bits_per_weight"] == pytest.approx(4 + 32 / 128 + 4 / 128, abs=1e-3)
    else:
        assert by_name["output.weight"]["action"] == "Q6_K"
        assert {by_name[f"blk.0.{n}.weight"]["action"] for n in ("attn_q", "ffn_gate")} == {"Q4_K"}
        assert plan["bits_per_weight"] == pytest.approx(4.8, abs=0.3)  # what llama.cpp reports for 7B Q4_K_M


def _header(directory: Path) -> dict:
    with (directory / "model.safetensors").open("rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


@pytest.fixture(scope="module")
def odd_widths(tmp_path_factory) -> Path:
    """Widths that neither 2:8 nor group 128 nor a K-quant's 256-weight block divide."""
    return _synthetic_checkpoint(tmp_path_factory.mktemp("odd") / "odd", hidden_size=100, intermediate_size=300,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=500)


def test_misfits_are_refused_with_the_plan_printed(odd_widths, sample_text_file, tmp_path):
    r = run_orstack("prune", odd_widths, "--calib", sample_text_file, "--pattern", "2:8", "-o", tmp_path / "p",
                    "--dry-run")
    assert r.returncode == 2 and "--pattern 2:8: input width of" in r.stderr and "not a multiple of 8" in r.stderr
    tensors, plan = _plan_rows(r.stdout)
    assert not plan["ok"] and any(not t["ok"] for t in tensors)
    r = run_orstack("awq", odd_widths, "--calib", sample_text_file, "--group-size", "128", "-o", tmp_path / "a",
                    "--dry-run")
    assert r.returncode == 2 and "--group-size 128 does not divide the input width" in r.stderr
    r = run_orstack("awq", odd_widths, "--calib", sample_text_file, "--group-size", "auto", "-o", tmp_path / "a",
                    "--dry-run")
    tensors, _ = _plan_rows(r.stdout)
    assert r.returncode == 0 and {t["action"] for t in tensors if t["name"].endswith("q_proj.weight")} == {"int4 g100"}
    # K-quants fall back where a row is not a multiple of 256, and say so per tensor
    r = run_orstack("gguf", odd_widths, "--type", "q5_k_m", "-o", tmp_path / "g.gguf", "--dry-run")
    tensors, plan = _plan_rows(r.stdout)
    assert r.returncode == 0 and any("not a multiple of 256" in t["detail"] for t in tensors)
    assert "Q5_K" not in {t["action"] for t in tensors}
    assert list(tmp_path.iterdir()) == []


def test_gguf_plan_predicts_the_written_tensors(random_llama, tmp_path):
    pytest.importorskip("gguf")
    r = run_orstack("gguf", random_llama, "--type", "q8_0", "-o", tmp_path / "x.gguf", "--dry-run")
    assert r.returncode == 0, r.stderr
    tensors, plan = _plan_rows(r.stdout)
    r = run_orstack("gguf", random_llama, "--type", "q8_0", "--no-validate", "-o", tmp_path / "x.gguf")
    assert r.returncode == 0, r.stderr
    from gguf import GGUFReader

    written = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(tmp_path / "x.gguf").tensors}
    assert {t["name"]: (t["action"], t["bytes_out"]) for t in tensors} == written


def test_vocab_trim_dry_run_names_the_kept_vocabulary(random_llama, sample_text_file, tmp_path):
    before = tree_hash(tmp_path)
    args = ("vocab-trim", random_llama, "--corpus", sample_text_file, "--max-vocab", "270", "-o", tmp_path / "t")
    r = run_orstack(*args, "--dry-run")
    assert r.returncode == 0, r.stderr
    tensors, plan = _plan_rows(r.stdout)
    emb = next(t for t in tensors if t["name"].endswith("embed_tokens.weight"))
    assert emb["action"].startswith("rows ") and "vocabulary" in r.stderr and tree_hash(tmp_path) == before
    assert plan["bytes_out"] < plan["bytes_in"]
    r = run_orstack(*args)  # the real trim keeps what the plan said
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "t" / "orstack.json").read_text())["metrics"]["vocab_after"] == emb["shape"][0]
