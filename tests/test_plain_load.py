"""No silent garbage (issue 21): every checkpoint orstack writes either loads in plain transformers
(`AutoModelForCausalLM.from_pretrained`, no extra arguments) with the logits orstack's own
loader gives, or transformers refuses it with an error -- never a model with random weights.

One row per stage output (docs of each stage say which it is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orstack.runtime import Runtime

RUNTIME = Runtime(device="cpu", threads=1)
LOADS, REFUSED = "loads", "refused"


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=ids).logits


def plain_transformers(path: Path, atol: float = 0.0) -> str:
    """LOADS when transformers gives orstack's logits (bit for bit, or within `atol`), REFUSED
    when it raises; fails otherwise."""
    from transformers import AutoModelForCausalLM

    from orstack.io.checkpoint import load_model

    ours, _ = load_model(path, with_tokenizer=False)
    try:
        theirs = AutoModelForCausalLM.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        assert str(e).strip(), "refused without a message"
        return REFUSED
    reference = _logits(ours)
    ok = torch.equal(_logits(theirs), reference) if atol == 0 else torch.allclose(_logits(theirs), reference, atol=atol)
    assert ok, f"{path}: transformers loads other weights than orstack"
    return LOADS


@pytest.fixture(scope="module")
def outputs(random_llama, sample_text_file, tmp_path_factory):
    """Each stage's output on the tiny random Llama: {name: (path, how plain transformers must take it)}."""
    from orstack.awq import run as awq
    from orstack.awq.search import AWQConfig
    from orstack.prune import run as prune
    from orstack.prune.stage import PruneConfig
    from orstack.vocab_trim.stage import run as vocab_trim
    from orstack.vocab_trim.trim import VocabTrimConfig

    base = tmp_path_factory.mktemp("plain")
    calib = [str(sample_text_file)]
    out = {}
    for name, compress in (("prune", True), ("prune --no-compress", False)):
        prune(random_llama, base / name, PruneConfig(method="magnitude", sparsity=0.5, nsamples=2, seqlen=32,
                                                     eval_length=64, calib=calib, compress=compress, force=True),
              RUNTIME)
    out["prune"] = (base / "prune", REFUSED)  # the sparse layout: no file transformers reads
    out["prune --no-compress"] = (base / "prune --no-compress", LOADS)
    rtn = {"rtn": True, "group_size": 64, "force": True}
    for name, source, options, expected in (
            ("awq", random_llama, {}, LOADS),  # asymmetric, one scheme: marked dequantize in config.json
            ("awq --symmetric", random_llama, {"symmetric": True}, LOADS),
            ("prune -> awq", base / "prune", {}, REFUSED)):  # sparse 4-bit
        awq(source, base / name, AWQConfig(**rtn, **options), RUNTIME)
        out[name] = (base / name, expected)
    vocab_trim(random_llama, base / "vocab-trim", VocabTrimConfig(corpus=calib, coverage=0.99, max_length=64,
                                                                 force=True), RUNTIME)
    out["vocab-trim"] = (base / "vocab-trim", LOADS)
    return out


@pytest.mark.parametrize("stage", ["prune", "prune --no-compress", "awq", "awq --symmetric", "prune -> awq",
                                   "vocab-trim"])
def test_stage_output_loads_or_is_refused_in_plain_transformers(outputs, stage):
    path, expected = outputs[stage]
    assert plain_transformers(path) == expected


def test_awq_with_several_schemes_is_refused_not_misread(random_llama, tmp_path):
    """Two bit widths in one asymmetric checkpoint (what --mixed-precision writes): transformers
    would decompress every module with one scheme if told to dequantize, so it is not told,
    and refuses the packed zero points."""
    from transformers import AutoModelForCausalLM

    from orstack.awq.grid import QuantSpec, quantize
    from orstack.awq.packed import write_packed
    from orstack.awq.search import target_linears

    model = AutoModelForCausalLM.from_pretrained(random_llama)
    quantized = {}
    with torch.no_grad():
        for i, (name, linear) in enumerate(target_linears(model).items()):
            q = quantize(linear.weight.data, QuantSpec(3 if i % 2 else 4, 64, False))
            linear.weight.data.copy_(q.dequantize(linear.weight.dtype))
            quantized[name] = q
    out = tmp_path / "mixed"
    model.config.save_pretrained(out)
    write_packed(model, quantized, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2 and "dequantize" not in config
    assert plain_transformers(out) == REFUSED


def test_distill_adapter_and_merge_load_in_plain_transformers(random_llama, tmp_path):
    """distill train's LoRA adapter (peft is installed: transformers loads base + adapter, the
    adapter kept beside the base weights where orstack folds it in, so equal up to float
    rounding) and its --merge output (a dense checkpoint, bit for bit)."""
    from orstack.distill.train import DistillTrainConfig, run_train
    from orstack.train.config import TrainConfig

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"rev {w}=", "response": w[::-1]}) + "\n"
                            for w in ("abc", "fox", "lazy", "dog") * 2), encoding="utf-8")
    for merge in (False, True):
        out = tmp_path / ("merged" if merge else "adapter")
        config = DistillTrainConfig(data=str(data), train=TrainConfig(max_steps=1, lr=1e-2, batch_size=4, lora_rank=4,
                                                                      merge=merge), force=True)
        run_train(str(random_llama), out, config, RUNTIME)
        assert plain_transformers(out, atol=0.0 if merge else 1e-4) == LOADS


def test_zstd_pack_is_refused_and_its_unpacked_copy_loads(outputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from orstack.zstd_pack import run_unpack
    from orstack.zstd_pack.stage import run as pack
    from orstack.zstd_pack.writer import PackConfig

    for stage, expected in (("prune --no-compress", LOADS), ("prune", REFUSED)):
        source, _ = outputs[stage]
        packed = tmp_path / f"{stage.replace(' ', '_')}.orz"
        pack(source, packed, PackConfig(threads=1))
        with pytest.raises((OSError, ValueError)):
            AutoModelForCausalLM.from_pretrained(str(packed))
        unpacked = tmp_path / f"{stage.replace(' ', '_')}-unpacked"
        run_unpack(packed, unpacked, 1)
        assert plain_transformers(unpacked) == expected  # the directory packed, as it was


def test_merge_output_loads_in_plain_transformers(outputs, random_llama, tmp_path):
    from orstack.merge import MergeConfig
    from orstack.merge import run as merge

    dense, _ = outputs["prune --no-compress"]
    merge([str(random_llama), str(dense)], tmp_path / "merged", MergeConfig(method="linear", force=True), RUNTIME)
    assert plain_transformers(tmp_path / "merged") == LOADS
