"""zstd-pack: lossless round trips, seekable tensor reads, dedup, integrity, CLI errors, .orz loading."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from orstack.cli import main
from orstack.zstd_pack import Pack, PackConfig, list_contents, pack, read_tensor, unpack, verify
from orstack.zstd_pack.layout import file_layout

SMALL_CHUNKS = PackConfig(chunk_size=4096, threads=2)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001 - pytest fixture
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def weights(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Trained-looking weights: gaussian matrices at a few scales, a norm vector, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    w = {
        "embed.weight": torch.randn(300, 64, generator=g) * 0.02,
        "layers.0.proj.weight": torch.randn(64, 128, generator=g) * 0.05,
        "layers.0.norm.weight": 1 + 0.1 * torch.randn(64, generator=g),
        "layers.0.bias": torch.zeros(64),
    }
    out = {k: v.to(dtype) for k, v in w.items()}
    out["position_ids"] = torch.arange(64, dtype=torch.int64)
    return out


@pytest.fixture(scope="module")
def st_files(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("st")
    files = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        files[name] = root / f"{name}.safetensors"
        save_file(weights(dtype), files[name], metadata={"format": "pt"})
    return files


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_string("general.name", "pack-test")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(50)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(50)])
    writer.add_tensor("token_embd.weight", (rng.standard_normal((50, 64)) * 0.02).astype(np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", (1 + 0.1 * rng.standard_normal(64)).astype(np.float16))
    q = gguf.quants.quantize((rng.standard_normal((64, 64)) * 0.05).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_safetensors_round_trip_is_bit_exact(st_files, tmp_path, name) -> None:
    src = st_files[name]
    summary = pack(src, tmp_path / "w.orz", SMALL_CHUNKS)
    assert summary.kinds == {"safetensors": 1}
    unpack(tmp_path / "w.orz", tmp_path / "restored.safetensors")
    assert sha(tmp_path / "restored.safetensors") == sha(src)
    rows = list_contents(tmp_path / "w.orz")
    floats = [r for r in rows if r["name"] == "embed.weight"][0]
    assert floats["transform"] == ("planes2" if name == "fp16" else f"swap-planes{4 if name == 'fp32' else 2}")
    assert [r for r in rows if r["name"] == "position_ids"][0]["transform"] == "raw"


def test_byte_grouping_beats_plain_zstd_on_bf16(tmp_path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "big.safetensors"
    save_file({"w": (torch.randn(512, 512, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()}, src)
    ours = pack(src, tmp_path / "big.orz").ratio
    plain = src.stat().st_size / len(zstandard.ZstdCompressor(level=19).compress(src.read_bytes()))
    # Gaussian bf16: 7 random mantissa bits + sign per value, exponent ~2.7 bits -> ~1.5x bound.
    assert ours > 1.4
    assert ours > plain + 0.1
    # --level 1 takes the fast path for exponent planes: still well above plain zstd, a bit below level 3.
    fast = pack(src, tmp_path / "fast.orz", PackConfig(level=1)).ratio
    assert plain + 0.05 < fast < ours
    unpack(tmp_path / "fast.orz", tmp_path / "fast.safetensors")
    assert sha(tmp_path / "fast.safetensors") == sha(src)


def test_single_tensor_reads_match_and_touch_only_their_frames(st_files, tmp_path) -> None:
    from safetensors.torch import load_file

    src = st_files["bf16"]
    packed = tmp_path / "w.orz"
    pack(src, packed, SMALL_CHUNKS)
    expected = load_file(src)
    with Pack(packed) as p:
        for name, tensor in expected.items():
            got = p.read_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
        embed = p.index["blobs"][[s for s in p.files[0]["segments"] if s["name"] == "embed.weight"][0]["blob"]]
    # Damage the embedding's frames: other tensors still read, the embedding is refused.
    data = bytearray(packed.read_bytes())
    for chunk in embed["chunks"]:
        data[chunk["offset"] + 5] ^= 0xFF
    packed.write_bytes(bytes(data))
    assert torch.equal(read_tensor(packed, "layers.0.proj.weight"), expected["layers.0.proj.weight"])
    with pytest.raises(Exception, match="corrupted"):
        read_tensor(packed, "embed.weight")


def test_gguf_round_trip_and_tensor_read(gguf_file, tmp_path) -> None:
    import gguf

    with gguf_file.open("rb") as fh:
        kind, segments = file_layout(memoryview(fh.read()))
    assert kind == "gguf"
    by_name = {s.name: s for s in segments}
    assert by_name["token_embd.weight"].dtype == "F32" and by_name["token_embd.weight"].shape == [50, 64]
    assert by_name["blk.0.attn_q.weight"].dtype == "Q8_0"
    pack(gguf_file, tmp_path / "m.orz", SMALL_CHUNKS)
    unpack(tmp_path / "m.orz", tmp_path / "m.gguf")
    assert sha(tmp_path / "m.gguf") == sha(gguf_file)
    reader = gguf.GGUFReader(str(gguf_file))
    for t in reader.tensors:
        got = read_tensor(tmp_path / "m.orz", t.name)
        assert got.numpy().tobytes() == bytes(t.data.tobytes()), t.name
    rows = {r["name"]: r for r in list_contents(tmp_path / "m.orz")}
    assert rows["blk.0.attn_q.weight"]["transform"] == "raw"  # quantized blocks are opaque
    assert rows["token_embd.weight"]["transform"] == "swap-planes4"


def test_directory_with_tokenizer_and_config_and_opaque_file(random_llama, tmp_path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(random_llama, src)
    (src / "extra").mkdir()
    (src / "extra" / "blob.bin").write_bytes(os.urandom(10_000) + b"\0" * 5000)
    (src / "empty.txt").write_bytes(b"")
    summary = pack(src, tmp_path / "c.orz", SMALL_CHUNKS)
    assert summary.kinds["safetensors"] == 1 and summary.kinds["opaque"] >= 4
    unpack(tmp_path / "c.orz", tmp_path / "restored")
    assert tree_digests(tmp_path / "restored") == tree_digests(src)
    assert verify(tmp_path / "c.orz").files == len(tree_digests(src))


def test_identical_tensors_are_stored_once(tmp_path) -> None:
    from safetensors.torch import save_file

    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    save_file({"a": w}, tmp_path / "one.safetensors")
    save_file({"a": w, "b": w.clone()}, tmp_path / "two.safetensors")
    one = pack(tmp_path / "one.safetensors", tmp_path / "one.orz")
    two = pack(tmp_path / "two.safetensors", tmp_path / "two.orz")
    assert two.duplicate_bytes == w.numel() * 4
    assert two.pack_bytes < one.pack_bytes + 1024
    rows = {r["name"]: r for r in list_contents(tmp_path / "two.orz")}
    assert rows["b"]["stored"] == 0 and rows["b"]["same_as"].endswith(":a")
    unpack(tmp_path / "two.orz", tmp_path / "two-restored.safetensors")
    assert sha(tmp_path / "two-restored.safetensors") == sha(tmp_path / "two.safetensors")


def test_dictionary_kept_only_when_it_pays(tmp_path) -> None:
    src = tmp_path / "configs"
    src.mkdir()
    for i in range(200):
        cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64 * (i % 7 + 1), "layer": i,
               "rope_theta": 10000.0, "torch_dtype": "float32", "vocab_size": 300 + i, "name": f"model-{i}"}
        (src / f"config-{i:03d}.json").write_text(json.dumps(cfg, indent=2))
    with_dict = pack(src, tmp_path / "d.orz", PackConfig(dict_size=16 * 1024))
    without = pack(src, tmp_path / "n.orz", PackConfig(use_dict=False))
    assert with_dict.dict_trial["used"] and with_dict.dict_trial["gain_bytes"] > 0
    assert with_dict.pack_bytes < without.pack_bytes
    assert without.dict_trial["dict_size"] == 0
    unpack(tmp_path / "d.orz", tmp_path / "restored")
    assert tree_digests(tmp_path / "restored") == tree_digests(src)


def _damaged_packs(packed: Path) -> dict[str, bytes]:
    data = packed.read_bytes()
    with Pack(packed) as p:
        chunks = [c for b in p.index["blobs"] for c in b["chunks"]]
        stored = [c for c in chunks if c["frames"][0][0] == 0]
        compressed = [c for c in chunks if c["frames"][-1][0] == 1]

    def flip(pos: int) -> bytes:
        out = bytearray(data)
        out[pos] ^= 0x01
        return bytes(out)

    return {
        "stored frame": flip(stored[0]["offset"] + 3),
        "zstd frame": flip(compressed[0]["offset"] + sum(n for _, n in compressed[0]["frames"]) - 7),
        "index": flip(len(data) - 60),
        "trailer": flip(len(data) - 40),
        "header": flip(2),
        "truncated end": data[:-1],
        "truncated half": data[: len(data) // 2],
    }


def test_corrupted_or_truncated_pack_is_refused_and_nothing_written(st_files, tmp_path, capsys) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp32"], packed, SMALL_CHUNKS)
    for what, data in _damaged_packs(packed).items():
        bad = tmp_path / "bad.orz"
        bad.write_bytes(data)
        out = tmp_path / "restored.safetensors"
        code, stdout, err = run(["zstd-pack", "-d", str(bad), "-o", str(out)], capsys)
        assert code == 2, (what, err)
        assert not out.exists() and stdout == "", what
        last = err.strip().splitlines()[-1]  # after the progress display: one error line
        assert last.startswith("orstack: error:") and ("corrupt" in last or "truncated" in last or "not an" in last)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".restored")] == [], what
        code, _, _ = run(["zstd-pack", "--verify", str(bad)], capsys)
        assert code == 2, what


def test_failed_unpack_leaves_existing_output_untouched(st_files, tmp_path, capsys) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp16"], packed, SMALL_CHUNKS)
    bad = tmp_path / "bad.orz"
    bad.write_bytes(_damaged_packs(packed)["stored frame"])
    out = tmp_path / "existing.safetensors"
    out.write_bytes(b"keep me")
    code, _, _ = run(["zstd-pack", "-d", str(bad), "-o", str(out)], capsys)
    assert code == 2 and out.read_bytes() == b"keep me"


def test_cli_pack_list_verify_unpack(random_llama, tmp_path, capsys) -> None:
    packed = tmp_path / "m.orz"
    code, out, err = run(["zstd-pack", str(random_llama), "-o", str(packed), "--level", "5", "--threads", "2",
                          "--dict-size", "64K"], capsys)
    assert code == 0 and out == "" and "ratio" in err
    code, out, _ = run(["zstd-pack", "--list", str(packed)], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {"model.safetensors", "config.json"} <= {r["file"] for r in rows}
    assert all(r["ratio"] is None or r["ratio"] > 0 for r in rows)
    assert run(["zstd-pack", "--verify", str(packed)], capsys)[0] == 0
    code, out, _ = run(["zstd-pack", "-d", str(packed), "-o", str(tmp_path / "restored")], capsys)
    assert code == 0 and out == ""
    assert tree_digests(tmp_path / "restored") == tree_digests(random_llama)
    with Pack(packed) as p:
        assert p.index["config"]["level"] == 5 and p.index["config"]["dict_size"] == 64 * 1024


@pytest.mark.parametrize("argv", [
    ["zstd-pack", "-d", "{notpack}", "-o", "{out}"],
    ["zstd-pack", "--list", "{notpack}"],
    ["zstd-pack", "--verify", "{notpack}"],
    ["zstd-pack", "{src}", "-o", "{out}", "--level", "0"],
    ["zstd-pack", "{src}", "-o", "{out}", "--dict-size", "lots"],
    ["zstd-pack", "{src}"],
    ["zstd-pack", "-d", "--list", "{notpack}"],
    ["zstd-pack", "/nonexistent/input", "-o", "{out}"],
])
def test_bad_input_exits_2_and_writes_nothing(st_files, tmp_path, capsys, argv) -> None:
    notpack = tmp_path / "model.orz"
    notpack.write_bytes(b"PK\x03\x04 this is a zip, not a pack" * 10)
    out = tmp_path / "out"
    argv = [a.format(notpack=notpack, out=out, src=st_files["fp32"]) for a in argv]
    code, stdout, err = run(argv, capsys)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_load_model_reads_an_orz_checkpoint(random_llama, tmp_path, monkeypatch) -> None:
    from orstack.io.checkpoint import load_model

    monkeypatch.setenv("ORSTACK_CACHE", str(tmp_path / "cache"))
    packed = tmp_path / "llama.orz"
    pack(random_llama, packed)
    reference, _ = load_model(random_llama, with_tokenizer=False)
    model, _ = load_model(packed, with_tokenizer=False)
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    entries = list((tmp_path / "cache" / "orz").iterdir())
    assert len(entries) == 1 and (entries[0] / "config.json").is_file()
    load_model(packed, with_tokenizer=False)  # second load reuses the cache entry
    assert list((tmp_path / "cache" / "orz").iterdir()) == entries


def test_unpack_refuses_to_turn_a_directory_into_a_file(st_files, tmp_path, capsys) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp32"], packed)
    (tmp_path / "somedir").mkdir()
    code, _, err = run(["zstd-pack", "-d", str(packed), "-o", str(tmp_path / "somedir")], capsys)
    assert code == 2 and "is a directory" in err and list((tmp_path / "somedir").iterdir()) == []
