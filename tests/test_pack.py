"""zstd-pack: lossless round trips, seekable tensor reads, dedup, integrity, CLI errors, .orz loading."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import run_orstack, run_orstack_read_only, tree_hash

from orstack.console import set_quiet
from orstack.zstd_pack import Pack, PackConfig, list_contents, pack, read_tensor, unpack, verify
from orstack.zstd_pack.layout import file_layout

SMALL_CHUNKS = PackConfig(chunk_size=4096, threads=2)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv: list[str], quiet: bool = True) -> tuple[int, str, str]:
    """`orstack [--quiet] ARGV` in this process: (exit code, stdout, stderr)."""
    result = run_orstack(*(["--quiet"] if quiet else []), *argv)
    set_quiet(False)
    return result.returncode, result.stdout, result.stderr


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


def test_corrupted_or_truncated_pack_is_refused_and_nothing_written(st_files, tmp_path) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp32"], packed, SMALL_CHUNKS)
    for what, data in _damaged_packs(packed).items():
        bad = tmp_path / "bad.orz"
        bad.write_bytes(data)
        out = tmp_path / "restored.safetensors"
        code, stdout, err = run(["zstd-pack", "-d", str(bad), "-o", str(out)])
        assert code == 2, (what, err)
        assert not out.exists() and stdout == "", what
        assert len(err.strip().splitlines()) == 1 and err.startswith("orstack: error:") and str(bad) in err, what
        assert "corrupt" in err or "truncated" in err or "not an" in err, (what, err)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".restored")] == [], what
        code, _, _ = run(["zstd-pack", "--verify", str(bad)])
        assert code == 2, what


def test_failed_unpack_leaves_existing_output_untouched(st_files, tmp_path) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp16"], packed, SMALL_CHUNKS)
    bad = tmp_path / "bad.orz"
    bad.write_bytes(_damaged_packs(packed)["stored frame"])
    out = tmp_path / "existing.safetensors"
    out.write_bytes(b"keep me")
    code, _, _ = run(["zstd-pack", "-d", str(bad), "-o", str(out)])
    assert code == 2 and out.read_bytes() == b"keep me"


def test_cli_pack_list_verify_unpack(random_llama, tmp_path) -> None:
    packed = tmp_path / "m.orz"
    code, out, err = run(["zstd-pack", str(random_llama), "-o", str(packed), "--level", "5", "--threads", "2",
                          "--dict-size", "64K"], quiet=False)
    assert code == 0 and out == "" and "ratio" in err
    code, out, _ = run(["zstd-pack", "--list", str(packed)])
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {"model.safetensors", "config.json"} <= {r["file"] for r in rows}
    assert all(r["ratio"] is None or r["ratio"] > 0 for r in rows)
    assert run(["zstd-pack", "--verify", str(packed)])[0] == 0
    code, out, _ = run(["zstd-pack", "-d", str(packed), "-o", str(tmp_path / "restored")])
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
def test_bad_input_exits_2_and_writes_nothing(st_files, tmp_path, argv) -> None:
    notpack = tmp_path / "model.orz"
    notpack.write_bytes(b"PK\x03\x04 this is a zip, not a pack" * 10)
    out = tmp_path / "out"
    argv = [a.format(notpack=notpack, out=out, src=st_files["fp32"]) for a in argv]
    code, stdout, err = run(argv)
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


def test_unpack_refuses_to_turn_a_directory_into_a_file(st_files, tmp_path) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp32"], packed)
    (tmp_path / "somedir").mkdir()
    code, _, err = run(["zstd-pack", "-d", str(packed), "-o", str(tmp_path / "somedir")])
    assert code == 2 and "is a directory" in err and list((tmp_path / "somedir").iterdir()) == []


# -- config = manifest -------------------------------------------------------------------------


def test_pack_index_records_the_config_and_cli_defaults_are_the_dataclass_defaults(st_files, tmp_path) -> None:
    import dataclasses

    from typer.main import get_command

    from orstack.cli import app
    from orstack.commands.zstd_pack import parse_size
    from orstack.io.manifest import config_from_manifest

    config = PackConfig(level=5, threads=1, chunk_size=8192, dict_size=4096, use_dict=False, small_blob=1024)
    pack(st_files["bf16"], tmp_path / "w.orz", config)
    with Pack(tmp_path / "w.orz") as p:
        assert config_from_manifest({"config_class": p.index["config_class"], "args": p.index["config"]}) == config
    params = {p.name: p.default for p in get_command(app).commands["zstd-pack"].params}
    cli = {"level": params["level"], "threads": params["threads"], "chunk_size": parse_size(params["chunk_size"], ""),
           "dict_size": parse_size(params["dict_size"], ""), "use_dict": not params["no_dict"]}
    defaults = {f.name: f.default for f in dataclasses.fields(PackConfig)}
    assert set(cli) == set(defaults) - {"small_blob"}  # small_blob has no option
    assert cli == {name: defaults[name] for name in cli}


# -- the output policy --------------------------------------------------------------------------


def test_pack_refuses_an_existing_directory_as_output_and_leaves_it(st_files, tmp_path) -> None:
    mydir = tmp_path / "mydir"
    mydir.mkdir()
    (mydir / "notes.txt").write_text("the user's own file")
    before = tree_hash(mydir)
    code, stdout, err = run(["zstd-pack", str(st_files["fp32"]), "-o", str(mydir)])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and str(mydir) in err
    assert "is a directory" in err and tree_hash(mydir) == before


def test_pack_refuses_to_overwrite_its_input(st_files, tmp_path) -> None:
    src = tmp_path / "w.safetensors"
    shutil.copy(st_files["fp32"], src)
    before = tree_hash(src)
    code, _, err = run(["zstd-pack", str(src), "-o", str(src)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(src) in err and "input" in err
    assert tree_hash(src) == before


def test_unpack_of_a_directory_pack_refuses_an_existing_file(random_llama, tmp_path) -> None:
    packed = tmp_path / "m.orz"
    pack(random_llama, packed)
    existing = tmp_path / "restored"
    existing.write_bytes(b"a file the user keeps")
    code, _, err = run(["zstd-pack", "-d", str(packed), "-o", str(existing)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(existing) in err and "is a file" in err
    assert existing.read_bytes() == b"a file the user keeps"


def test_unpack_refuses_a_directory_orstack_did_not_write(st_files, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(st_files["fp16"], src / "w.safetensors")
    packed = tmp_path / "d.orz"
    pack(src, packed)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    before = tree_hash(mine)
    code, _, err = run(["zstd-pack", "-d", str(packed), "-o", str(mine)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(mine) in err and "not written by orstack" in err
    assert tree_hash(mine) == before


def test_pack_into_a_read_only_location_is_refused_up_front(st_files, tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "old.orz").write_bytes(b"an old pack")
    before = tree_hash(ro)
    result = run_orstack_read_only(ro, "zstd-pack", st_files["fp32"], "-o", ro / "new.orz")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(ro / "new.orz") in result.stderr
    assert "cannot write" in result.stderr and tree_hash(ro) == before


# -- integrity: one flipped byte anywhere ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    """The smallest loadable checkpoint (a 1-layer Llama of width 8, bf16) as a ~4 KB pack."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-pack")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "model")
    pack(root / "model", root / "model.orz", PackConfig(threads=1))
    return root / "model.orz"


def _flip_in_place(path: Path, position: int, stat: os.stat_result) -> None:
    """Flip the lowest bit of one byte, in place, and restore the mtime: damage that size, inode
    and mtime do not show (bit rot)."""
    with path.open("r+b") as fh:
        fh.seek(position)
        byte = fh.read(1)[0]
        fh.seek(position)
        fh.write(bytes([byte ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_every_flipped_byte_is_found_by_every_reader_cold_and_warm(tiny_pack, tmp_path, monkeypatch) -> None:
    from orstack.errors import BadInput
    from orstack.io.checkpoint import load_model
    from orstack.zstd_pack import run_list, run_unpack, run_verify

    set_quiet(True)
    bad = tmp_path / "bad.orz"
    shutil.copy(tiny_pack, bad)
    out = tmp_path / "restored"
    cold, warm = tmp_path / "cold-cache", tmp_path / "warm-cache"
    monkeypatch.setenv("ORSTACK_CACHE", str(warm))
    load_model(bad, with_tokenizer=False)  # one good use: the intact pack's entry is in the warm cache
    warm_entries = sorted((warm / "orz").iterdir())
    assert len(warm_entries) == 1
    stat = bad.stat()
    readers = {
        "--verify": lambda: run_verify(bad, 1),
        "-d": lambda: run_unpack(bad, out, 1),
        "--list": lambda: run_list(bad),
        "load_model cold": lambda: load_model(bad, with_tokenizer=False),
        "load_model warm": lambda: load_model(bad, with_tokenizer=False),
    }
    missed: dict[str, list[int]] = {name: [] for name in readers}
    checked = 0
    try:
        for position in range(stat.st_size):
            _flip_in_place(bad, position, stat)
            for name, read in readers.items():
                monkeypatch.setenv("ORSTACK_CACHE", str(warm if name.endswith("warm") else cold))
                try:
                    read()
                    missed[name].append(position)
                except BadInput as e:
                    assert str(bad) in str(e) and "\n" not in str(e), (name, position, str(e))
                checked += 1
            assert not out.exists()
            _flip_in_place(bad, position, stat)  # undo
    finally:
        set_quiet(False)
    assert missed == {name: [] for name in readers}
    assert checked == 5 * stat.st_size
    assert not (cold / "orz").exists() or list((cold / "orz").iterdir()) == []  # nothing damaged was cached
    assert sorted((warm / "orz").iterdir()) == warm_entries
    assert sha(bad) == sha(tiny_pack)


@pytest.mark.parametrize("mode", ["--verify", "-d", "--list"])
def test_a_flipped_byte_through_the_cli_is_exit_2_naming_the_pack_and_tensor(st_files, tmp_path, mode) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp32"], packed, SMALL_CHUNKS)
    with Pack(packed) as p:
        segment = next(s for s in p.files[0]["segments"] if s["name"] == "layers.0.proj.weight")
        chunk = p.index["blobs"][segment["blob"]]["chunks"][0]
    data = bytearray(packed.read_bytes())
    data[chunk["offset"] + 3] ^= 0x01
    packed.write_bytes(bytes(data))
    out = tmp_path / "restored.safetensors"
    code, stdout, err = run(["zstd-pack", mode, str(packed), *(["-o", str(out)] if mode == "-d" else [])])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert str(packed) in err and "layers.0.proj.weight" in err and not out.exists()


def test_a_failed_unpack_leaves_only_the_error_on_stderr(st_files, tmp_path) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp32"], packed, SMALL_CHUNKS)
    packed.write_bytes(_damaged_packs(packed)["stored frame"])
    for mode in (["-d", str(packed), "-o", str(tmp_path / "out")], ["--verify", str(packed)]):
        code, _, err = run(["zstd-pack", *mode], quiet=False)  # with the progress display on
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("orstack: error:"), err


def test_a_flipped_header_flag_is_found(st_files, tmp_path) -> None:
    packed = tmp_path / "w.orz"
    pack(st_files["fp32"], packed, SMALL_CHUNKS)
    data = bytearray(packed.read_bytes())
    data[12] ^= 0x01  # the flags word of the header, which no decoder reads
    packed.write_bytes(bytes(data))
    code, _, err = run(["zstd-pack", "--verify", str(packed)])
    assert code == 2 and "header flags" in err and str(packed) in err


def test_cache_is_keyed_by_the_pack_file_itself(tiny_pack, tmp_path, monkeypatch) -> None:
    from orstack.zstd_pack import cached_unpack

    monkeypatch.setenv("ORSTACK_CACHE", str(tmp_path / "cache"))
    entry = cached_unpack(tiny_pack)
    assert entry.name == sha(tiny_pack) and (entry / "config.json").is_file()
    assert cached_unpack(tiny_pack) == entry


# -- signals and a full disk -------------------------------------------------------------------

ENV = dict(os.environ, NO_COLOR="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def big_safetensors(tmp_path_factory) -> Path:
    """64 MB of gaussian fp32: several seconds of packing on this machine (exponent planes take zstd's
    optimal parser), so a signal lands mid-pack."""
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    rng = np.random.default_rng(0)
    save_file({"w": rng.standard_normal(16_000_000, dtype=np.float32) * 0.02}, str(path))
    return path


@pytest.mark.parametrize(("signum", "code", "message"), [(signal.SIGINT, 130, "interrupted"),
                                                         (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_pack_exits_cleanly_and_keeps_the_old_output(big_safetensors, tmp_path, signum, code,
                                                                  message) -> None:
    import subprocess
    import sys
    import time

    out = tmp_path / "out.orz"
    out.write_bytes(b"the previous pack")
    # SIGINT at its default, as in a terminal (a test runner started in the background of a
    # non-interactive shell would otherwise pass SIGINT on as ignored).
    proc = subprocess.Popen([sys.executable, "-m", "orstack", "--quiet", "zstd-pack", str(big_safetensors), "-o",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.orz.tmp-*")):  # the pack is being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert stderr.strip() == f"orstack: error: {message}" and stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["out.orz"] and out.read_bytes() == b"the previous pack"


def test_a_full_disk_is_one_line_and_leaves_nothing(big_safetensors, tmp_path) -> None:
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace (unshare -rm) for a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    # A 1 MB tmpfs: the 64 MB input cannot fit; afterwards the script lists what is left on it.
    script = ('mount -t tmpfs -o size=1m tmpfs "$0" && "$@"; rc=$?; ls -A "$0" >&2; exit $rc')
    out = small / "out.orz"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(small), sys.executable, "-m", "orstack",
                           "--quiet", "zstd-pack", str(big_safetensors), "-o", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"orstack: error: no space left on device writing {out}"]


# -- decoding details, lazy per-tensor access, old packs ----------------------------------------


@pytest.mark.parametrize("transform", ["swap-planes2", "swap-planes4", "planes2", "planes8", "raw"])
def test_join_into_inverts_split_planes_on_every_bit_pattern(transform) -> None:
    from orstack.zstd_pack.codec import Scratch, join_into, split_planes

    rng = np.random.default_rng(0)
    scratch = Scratch()
    # Every 16-bit pattern (all signs, exponents, NaNs, subnormals of bf16/fp16) plus random words,
    # through the same scratch arrays at several sizes (reuse must not leak one chunk into the next).
    every = np.arange(1 << 16, dtype=np.uint16).tobytes()
    for raw in (every, rng.integers(0, 256, 4096 * 8, dtype=np.uint8).tobytes(), every[:64], b""):
        out = np.full(len(raw), 0xAA, dtype=np.uint8)
        join_into(split_planes(raw, transform), transform, out, scratch)
        assert out.tobytes() == raw


def test_lazy_access_equals_the_full_decode_bit_for_bit(tmp_path) -> None:
    """open_pack over a sharded checkpoint: every tensor equals what unpacking gives, dtype, shape and
    bits, an empty tensor included; only the tensor asked for is decoded."""
    from safetensors.torch import load_file

    from orstack.io.safetensors_file import ShardedWriter, TensorReader
    from orstack.zstd_pack import open_pack

    src = tmp_path / "model"
    src.mkdir()
    writer = ShardedWriter(src, shard_bytes=60_000, metadata={"format": "pt"})
    tensors = {**weights(torch.float32), **{f"bf16.{k}": v for k, v in weights(torch.bfloat16, 1).items()},
               **{f"fp16.{k}": v for k, v in weights(torch.float16, 2).items()}, "empty": torch.zeros(0, 3)}
    for name, t in tensors.items():
        writer.add(name, t)
    assert len(writer.close()) > 2
    (src / "config.json").write_text("{}")
    pack(src, tmp_path / "m.orz", SMALL_CHUNKS)
    unpack(tmp_path / "m.orz", tmp_path / "restored")
    full = TensorReader(tmp_path / "restored")
    with open_pack(tmp_path / "m.orz") as lazy:
        assert sorted(lazy) == sorted(full.keys()) == sorted(tensors) and len(lazy) == len(tensors)
        assert lazy.nbytes() == full.nbytes() and lazy.metadata == full.metadata == {"format": "pt"}
        decoded: list[int] = []
        real = lazy.pack.decode_blob
        lazy.pack.decode_blob = lambda blob, what: decoded.append(blob) or real(blob, what)
        for name in tensors:
            got, want = lazy[name], full.get(name)
            assert got.dtype == want.dtype == lazy.dtype(name) and got.shape == want.shape == lazy.shape(name)
            assert got.view(-1).view(torch.uint8).numpy().tobytes() == want.view(-1).view(torch.uint8).numpy().tobytes()
        assert len(decoded) == len(tensors) - 1  # the empty tensor has no bytes to decode
        assert lazy.get("no.such.tensor") is None and "no.such.tensor" not in lazy
    for f in (tmp_path / "restored").glob("*.safetensors"):
        assert all(torch.equal(v, tensors[k]) for k, v in load_file(f).items())


def test_a_corrupted_tensor_is_found_on_lazy_access(st_files, tmp_path) -> None:
    from orstack.errors import BadInput
    from orstack.zstd_pack import open_pack

    packed = tmp_path / "w.orz"
    pack(st_files["bf16"], packed, SMALL_CHUNKS)
    with Pack(packed) as p:
        seg = [s for s in p.files[0]["segments"] if s["name"] == "layers.0.proj.weight"][0]
        blob = p.index["blobs"][seg["blob"]]
    stored = [c for c in blob["chunks"] if c["frames"][0][0] == 0]  # a mantissa plane stored as is:
    assert stored  # a flipped bit there decodes without error, so only the SHA-256 can find it
    data = bytearray(packed.read_bytes())
    data[stored[0]["offset"] + 3] ^= 0x01
    packed.write_bytes(bytes(data))
    with open_pack(packed) as lazy:
        assert torch.equal(lazy["embed.weight"], weights(torch.bfloat16)["embed.weight"])
        with pytest.raises(BadInput, match=r"corrupted pack: tensor layers\.0\.proj\.weight fails its SHA-256"):
            lazy["layers.0.proj.weight"]
    with pytest.raises(BadInput, match="layers.0.proj.weight"):
        verify(packed)


def test_a_pack_written_before_this_reader_still_decodes(tmp_path) -> None:
    """tests/data/pack-v1.orz was written by the zstd-pack of commit 8c7af3b (before decoding went
    into preallocated buffers): one safetensors file of fp32, bf16, fp16, int64 and an empty tensor
    in 4 KiB chunks. It unpacks to the original bytes, and reads lazily to the same tensors."""
    from safetensors.torch import load_file

    from orstack.zstd_pack import open_pack

    old = Path(__file__).parent / "data" / "pack-v1.orz"
    verify(old)
    unpack(old, tmp_path / "v1.safetensors")
    assert sha(tmp_path / "v1.safetensors") == "85534e8070802b213cdb99cf6a0c44b6f938d5c469fb72b0a601c107e9586010"
    expected = load_file(tmp_path / "v1.safetensors")
    with open_pack(old) as lazy:
        assert sorted(lazy) == sorted(expected)
        for name, tensor in expected.items():
            assert lazy[name].dtype == tensor.dtype and torch.equal(lazy[name], tensor)
            if tensor.numel():
                assert torch.equal(read_tensor(old, name), tensor)


def test_a_streamed_stage_reads_a_pack_tensor_by_tensor_without_unpacking(random_llama, tmp_path,
                                                                           monkeypatch) -> None:
    """A plain checkpoint in a .orz streams (load_streamed gives the in-memory model's logits) with
    only its config files extracted; a packed sparse checkpoint does not (its format needs its loader)."""
    from orstack.io.checkpoint import can_stream, load_model
    from orstack.layerwise import load_streamed

    monkeypatch.setenv("ORSTACK_CACHE", str(tmp_path / "cache"))
    packed = tmp_path / "m.orz"
    pack(random_llama, packed, PackConfig(threads=2))
    assert can_stream(packed)
    streamed, _ = load_streamed(packed, with_tokenizer=False)
    assert not (tmp_path / "cache" / "orz").exists()  # nothing unpacked whole
    config_files = sorted(p.name for p in (tmp_path / "cache" / "orz-config").rglob("*") if p.is_file())
    assert "config.json" in config_files and not any(n.endswith(".safetensors") for n in config_files)
    full, _ = load_model(random_llama, with_tokenizer=False)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, full(ids).logits)
    manifest = json.loads((random_llama / "orstack.json").read_text()) if (random_llama / "orstack.json").exists() \
        else {}
    sparse = tmp_path / "sparse"
    shutil.copytree(random_llama, sparse)
    (sparse / "orstack.json").write_text(json.dumps({**manifest, "weights_format": "orstack-sparse-bitmask"}))
    pack(sparse, tmp_path / "sparse.orz", PackConfig(threads=2))
    assert not can_stream(tmp_path / "sparse.orz")
