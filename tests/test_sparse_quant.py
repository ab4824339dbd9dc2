"""Sparse 4-bit (issue 21): awq on a sparse prune output keeps each pruned Linear's mask and packs
only the kept codes (2:4: values + 2-bit indices; otherwise a bitmask), loads through orstack's
loader bit for bit as the dense pack-quantized weights (= the fake-quant weights with the mask),
is smaller than awq alone, and is refused by plain transformers instead of loading as garbage."""

from __future__ import annotations

import json

import pytest
import torch

from orstack.awq.grid import QuantSpec, quantize
from orstack.runtime import Runtime


def _pruned(out: int, cols: int, pattern: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen)
    if pattern == "2:4":  # the two smallest of every group of 4 pruned
        groups = w.abs().reshape(out, -1, 4)
        keep = torch.ones_like(groups, dtype=torch.bool).scatter(-1, groups.topk(2, -1, largest=False).indices, False)
        keep = keep.reshape(out, cols)
    else:
        keep = torch.rand(out, cols, generator=gen) >= float(pattern)
    return w * keep, keep


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("pattern", ["2:4", "0.5", "0.7"])
def test_sparse_layout_round_trips_bit_for_bit_and_is_smaller(pattern, symmetric, bits):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from orstack.awq.packed import FORMAT, compress_module, decompress_module, stored_mask

    w, keep = _pruned(48, 192, pattern)
    spec = QuantSpec(bits, 64, symmetric)
    q = quantize(w, spec)
    dense = compress_module(q, torch.float32)
    sparse = compress_module(q, torch.float32, keep)
    assert ("weight_meta" in sparse) == (pattern == "2:4")
    assert ("weight_bitmask" in sparse) == (pattern != "2:4")
    scheme = QuantizationScheme(targets=[], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=64), format=FORMAT)
    fake = q.dequantize(torch.float32)
    assert torch.equal(decompress_module(dense, scheme, "dense"), fake)
    assert torch.equal(decompress_module(sparse, scheme, "sparse"), fake)  # bit for bit
    assert bool((fake[~keep] == 0).all())
    mask = stored_mask(sparse, tuple(w.shape))
    assert torch.equal(mask, keep)
    size = sum(t.numel() * t.element_size() for t in sparse.values())
    # 4 bits: 3 bits a weight at 50% (codes + 1 bit of mask or index); 3 bits: 2.5 against 3
    assert size < (0.85 if bits == 4 else 0.95) * sum(t.numel() * t.element_size() for t in dense.values())


def test_two_four_with_fewer_kept_pads_with_zero_codes_and_dense_mask_stays_dense():
    from orstack.awq.packed import compress_module, sparsify, stored_mask

    w, keep = _pruned(16, 64, "2:4", seed=1)
    w[:, :4] = 0  # a whole group pruned: two zero codes stand in for its kept values
    keep[:, :4] = False
    q = quantize(w, QuantSpec(4, 32))
    sparse = compress_module(q, torch.float32, keep)
    mask = stored_mask(sparse, (16, 64))
    assert bool(mask[keep].all()) and int(mask.sum()) == 16 * 32
    dense = compress_module(q, torch.float32)
    assert sparsify(dense, torch.ones(16, 64, dtype=torch.bool), 4, 32) is dense  # nothing to gain
    bad = keep.clone()
    bad[0, 0] = False
    bad[0, 1] = False
    nonzero = compress_module(quantize(torch.randn(16, 64), QuantSpec(4, 32)), torch.float32)
    with pytest.raises(RuntimeError, match="zero code"):
        sparsify(nonzero, bad, 4, 32)


@pytest.fixture(scope="module")
def sparse_chain(random_llama, sample_text_file, tmp_path_factory):
    """prune 50% (unstructured, also --no-compress) and 2:4 -> awq --rtn; the unstructured one also
    --fake-quant, the 2:4 one also in memory; awq of the unpruned model. {name: output directory}."""
    from orstack.awq.search import AWQConfig
    from orstack.awq.stage import run as awq
    from orstack.prune.stage import PruneConfig
    from orstack.prune.stage import run as prune

    base = tmp_path_factory.mktemp("sparse-quant")
    runtime = Runtime(device="cpu", threads=1)
    calib = [str(sample_text_file)]
    out = {}
    for name, options in (("unstructured-sparse", {"sparsity": 0.5}), ("2:4-sparse", {"pattern": "2:4"}),
                          ("unstructured-dense", {"sparsity": 0.5, "compress": False})):
        out[f"pruned-{name}"] = base / f"pruned-{name}"
        prune(random_llama, out[f"pruned-{name}"], PruneConfig(method="magnitude", calib=calib, nsamples=2, seqlen=32,
                                                               eval_length=64, force=True, **options), runtime)
    rtn = {"rtn": True, "group_size": 64, "force": True}
    for name, source, options, rt in (
            ("awq-pruned-unstructured-sparse", "pruned-unstructured-sparse", {}, runtime),
            ("awq-pruned-2:4-sparse", "pruned-2:4-sparse", {}, runtime),
            ("awq-pruned-unstructured-dense", "pruned-unstructured-dense", {}, runtime),
            ("fake-unstructured", "pruned-unstructured-sparse", {"fake_quant": True}, runtime),
            ("memory-2:4", "pruned-2:4-sparse", {}, Runtime(device="cpu", threads=1, stream=False))):
        awq(out[source], base / name, AWQConfig(**rtn, **options), rt)
        out[name] = base / name
    awq(random_llama, base / "awq-base", AWQConfig(**rtn), runtime)
    out["awq-base"] = base / "awq-base"
    return out


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _linear_bytes(path) -> int:
    """Bytes of the decoder Linears' tensors as stored (codes, masks, scales, zero points)."""
    from orstack.io.safetensors_file import TensorReader

    reader = TensorReader(path)
    return sum(reader.get(k).numel() * reader.get(k).element_size() for k in reader.keys() if "_proj." in k)


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_awq_of_a_sparse_prune_is_sparse_exact_and_smaller(sparse_chain, kind):
    from orstack.awq.packed import SPARSE_FORMAT, packed_reader
    from orstack.io.checkpoint import detect_format, load_model
    from orstack.prune.storage import stored_masks

    packed = sparse_chain[f"awq-pruned-{kind}-sparse"]
    assert detect_format(packed) == SPARSE_FORMAT
    assert json.loads((packed / "orstack.json").read_text())["weights_format"] == SPARSE_FORMAT
    assert not (packed / "model.safetensors").exists()
    ours, _ = load_model(packed, with_tokenizer=False)
    state = ours.state_dict()
    if kind == "unstructured":  # bit for bit the fake-quant weights (which keep the pruned zeros)
        fake, _ = load_model(sparse_chain["fake-unstructured"], with_tokenizer=False)
        for name, param in fake.state_dict().items():
            assert torch.equal(state[name], param), name
    else:  # the same bytes written layer by layer and in memory
        memory = sparse_chain["memory-2:4"]
        assert [f.read_bytes() for f in sorted(packed.glob("*.safetensors"))] == \
            [f.read_bytes() for f in sorted(memory.glob("*.safetensors"))]
    # the masks come back as the prune stored them, and every pruned weight is exactly 0
    reader = packed_reader(packed)
    pruned = stored_masks(sparse_chain[f"pruned-{kind}-sparse"])
    masks = reader.masks()
    assert masks and set(masks) == pruned.names
    for name, mask in masks.items():
        assert torch.equal(mask, pruned.get(name)) if kind == "unstructured" else bool(mask[pruned.get(name)].all())
        assert bool((state[name][~mask] == 0).all())
    layout = "weight_meta" if kind == "2:4" else "weight_bitmask"
    assert any(k.endswith(layout) for k in reader.raw.keys())
    # smaller than awq alone, and than awq of the same pruned model stored densely: the Linears
    # by about a quarter (3 bits a weight instead of 4, the same scales); the embeddings are fp32
    dense_input = sparse_chain["awq-pruned-unstructured-dense"]
    assert detect_format(dense_input) == "compressed-tensors-pack-quantized"
    for reference in (sparse_chain["awq-base"], dense_input):
        assert _linear_bytes(packed) < 0.85 * _linear_bytes(reference)
        assert _size(packed) < _size(reference) - 0.15 * _linear_bytes(reference)


def test_sparse_outputs_are_refused_by_plain_transformers(sparse_chain):
    from transformers import AutoModelForCausalLM

    for name in ("pruned-unstructured-sparse", "awq-pruned-2:4-sparse"):
        with pytest.raises(OSError, match="no file named model.safetensors"):
            AutoModelForCausalLM.from_pretrained(sparse_chain[name])


def test_legacy_sparse_checkpoint_still_loads(sparse_chain, tmp_path):
    """A sparse prune output written before the rename (model.safetensors) still loads here."""
    import shutil

    from orstack.io.checkpoint import detect_format, load_model

    new = sparse_chain["pruned-unstructured-sparse"]
    legacy = tmp_path / "legacy"
    shutil.copytree(new, legacy)
    (legacy / "orstack-sparse.safetensors").rename(legacy / "model.safetensors")
    manifest = json.loads((legacy / "orstack.json").read_text())
    manifest.pop("weights_format")  # detection from the file alone
    (legacy / "orstack.json").write_text(json.dumps(manifest))
    assert detect_format(legacy) == "orstack-sparse-bitmask"
    a, _ = load_model(new, with_tokenizer=False)
    b, _ = load_model(legacy, with_tokenizer=False)
    for name, param in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], param), name


def test_sharded_sparse_checkpoint_names_its_own_index(tmp_path):
    from orstack.io.safetensors_file import TensorReader
    from orstack.prune.storage import add_tensor, is_sparse_checkpoint, sparse_reader, sparse_writer

    writer = sparse_writer(tmp_path, shard_bytes=4000)
    tensors = {f"m{i}.weight": _pruned(32, 64, "0.5", seed=i)[0] for i in range(4)}
    for name, t in tensors.items():
        add_tensor(writer, name, t, sparse=True)
    files = writer.close()
    assert len(files) > 1 and all(f.name.startswith("orstack-sparse-") for f in files)
    assert (tmp_path / "orstack-sparse.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert is_sparse_checkpoint(tmp_path)
    assert set(TensorReader(tmp_path).keys()) >= {"m0.weight.bitmask", "m3.weight.values"}
    reader = sparse_reader(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t)
