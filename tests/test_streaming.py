"""Models larger than memory: a streamed run (weights read layer by layer from safetensors,
orstack.layerwise.StreamedModel) writes the same output as the run that loads the whole model.

The source here is the random Llama saved in bfloat16 and sharded by transformers, so the
index, the shards and the checkpoint's own dtype are all exercised.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from orstack.io.safetensors_file import ShardedWriter, TensorReader
from orstack.runtime import Runtime

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bf16_sharded(random_llama, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "model"
    model = AutoModelForCausalLM.from_pretrained(random_llama, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="400KB")
    for f in random_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from conftest import SAMPLE_TEXT

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    return path


def _state(directory: Path) -> dict[str, torch.Tensor]:
    from orstack.io.checkpoint import open_weights

    reader = open_weights(directory)
    return {name: reader.get(name) for name in reader.keys()}


def _runs(stage, source: Path, tmp_path: Path, config_for) -> dict[bool, tuple[Path, object]]:  # noqa: ANN001
    out = {}
    for stream in (True, False):
        path = tmp_path / ("streamed" if stream else "in-memory")
        out[stream] = (path, stage.run(source, path, config_for(), Runtime(device="cpu", stream=stream)))
    return out


# -- the pieces ------------------------------------------------------------------------------

def test_sharded_writer_round_trips_and_transformers_loads_it(random_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    source = TensorReader(random_llama)
    writer = ShardedWriter(tmp_path, shard_bytes=300_000, metadata={"format": "pt"})
    for name in source.keys():
        writer.add(name, source.get(name))
    files = writer.close()
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch file left
    copy = TensorReader(tmp_path)
    assert all(torch.equal(copy.get(n), source.get(n)) for n in source.keys())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == source.nbytes() and set(index["weight_map"]) == set(source.keys())
    shutil.copy(random_llama / "config.json", tmp_path / "config.json")
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(random_llama)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_forward_is_the_loaded_forward_and_keeps_no_layer(tmp_path, tie):
    from conftest import build_random_llama

    from orstack.io.checkpoint import load_model
    from orstack.layerwise import load_streamed, stream_of

    source = build_random_llama(tmp_path / "m", layers=3, tie=tie)
    loaded, _ = load_model(source, with_tokenizer=False)
    streamed, _ = load_streamed(source, with_tokenizer=False)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, loaded(input_ids=ids).logits)
    stream = stream_of(streamed)
    held = {n for n, (p, shape) in stream.params.items() if p.numel() == math.prod(shape)}
    assert held == set(stream.resident) and held <= {"model.norm.weight"}  # every unit dropped again
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_perplexity_reads_each_layer_once_and_scores_the_same_bits(tmp_path, tie):
    from conftest import SAMPLE_TEXT, build_random_llama

    from orstack.backends.perplexity import perplexity
    from orstack.io.checkpoint import load_model
    from orstack.layerwise import load_streamed, stream_of

    source = build_random_llama(tmp_path / "m", layers=3, tie=tie)
    loaded, tokenizer = load_model(source)
    streamed, _ = load_streamed(source)
    reader = stream_of(streamed).reader
    reads: list[str] = []
    get = reader.get
    reader.get = lambda name: reads.append(name) or get(name)
    texts = [SAMPLE_TEXT, SAMPLE_TEXT[:300], SAMPLE_TEXT[100:] * 2]  # windows of several widths, padded
    a = perplexity(streamed, tokenizer, texts, max_length=48, batch_size=2)
    b = perplexity(loaded, tokenizer, texts, max_length=48, batch_size=2)
    assert a.n_tokens == b.n_tokens > 4 * 48  # more than two batches
    assert a.nll == b.nll
    layer_reads = [n for n in reads if ".layers." in n]
    assert layer_reads and len(layer_reads) == len(set(layer_reads))  # once each, not once per batch


# -- each stage: streamed == in memory --------------------------------------------------------

def test_prune_streamed_writes_the_in_memory_weights(bf16_sharded, calib, tmp_path):
    from orstack import prune

    runs = _runs(prune, bf16_sharded, tmp_path, lambda: prune.PruneConfig(
        method="wanda", calib=[str(calib)], nsamples=4, seqlen=32, eval_length=64, prune_lm_head=True))
    streamed, memory = _state(runs[True][0]), _state(runs[False][0])
    assert streamed.keys() == memory.keys()
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16, name  # the checkpoint's dtype, not the float32 of the arithmetic
        assert torch.equal(tensor, memory[name].to(torch.bfloat16)), name  # pruning keeps bf16 values exactly
        assert torch.equal(tensor.float(), memory[name]), name
    ms, mm = runs[True][1].metrics, runs[False][1].metrics
    assert ms["layer_sparsity"] == mm["layer_sparsity"] and ms["sparsity"] == mm["sparsity"] > 0.4
    assert ms["ppl_before"] == mm["ppl_before"] and ms["ppl_after"] == mm["ppl_after"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging directory is gone


def test_prune_streamed_perplexity_without_lm_head_is_the_in_memory_one(random_llama, calib, tmp_path):
    from orstack import prune

    # lm_head not pruned (the default): the sweep's perplexities are taken after it, the head read as stored
    runs = _runs(prune, random_llama, tmp_path, lambda: prune.PruneConfig(
        method="magnitude", calib=[str(calib)], heldout=[str(calib)], nsamples=2, seqlen=32, eval_length=48,
        force=True))
    ms, mm = runs[True][1].metrics, runs[False][1].metrics
    assert ms["ppl_before"] == mm["ppl_before"] and ms["ppl_after"] == mm["ppl_after"] != ms["ppl_before"]


def test_awq_streamed_packs_the_in_memory_codes(random_llama, calib, tmp_path):
    from orstack import awq

    runs = _runs(awq, random_llama, tmp_path, lambda: awq.AWQConfig(
        calib=[str(calib)], nsamples=4, seqlen=32, group_size=64, heldout=[str(calib)], eval_length=64,
        force=True))
    raw_s, raw_m = TensorReader(runs[True][0]), TensorReader(runs[False][0])
    assert set(raw_s.keys()) == set(raw_m.keys())
    assert all(torch.equal(raw_s.get(n), raw_m.get(n)) for n in raw_s.keys())  # packed codes, scales, norms
    streamed, memory = _state(runs[True][0]), _state(runs[False][0])  # dequantized on reading
    for name, tensor in streamed.items():
        torch.testing.assert_close(tensor, memory[name], rtol=0, atol=1e-6)
    ms, mm = runs[True][1].metrics, runs[False][1].metrics
    assert math.isclose(ms["ppl_after"], mm["ppl_after"], rel_tol=1e-6)
    assert math.isclose(ms["output_error"], mm["output_error"], rel_tol=1e-6)
    qs, qm = (json.loads((runs[s][0] / "config.json").read_text())["quantization_config"] for s in (True, False))
    assert {k: v for k, v in qs.items() if k != "config_groups"} == {k: v for k, v in qm.items()
                                                                     if k != "config_groups"}
    assert list(qs["config_groups"].values()) == list(qm["config_groups"].values())


def test_gguf_streamed_writes_the_in_memory_tensors(bf16_sharded, tmp_path):
    import gguf as gg

    from orstack import gguf
    from orstack.gguf.metadata import MANIFEST_KEY

    runs = _runs(gguf, bf16_sharded, tmp_path, lambda: gguf.GgufConfig(type="q4_k_m", validate=False))
    a, b = (gg.GGUFReader(str(runs[s][0])) for s in (True, False))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name
    fields = lambda r: {k: (f.types, [bytes(p) for p in f.parts]) for k, f in r.fields.items()  # noqa: E731
                        if k != MANIFEST_KEY}
    assert fields(a) == fields(b)


def test_vocab_trim_streamed_writes_the_in_memory_weights(random_llama, calib, tmp_path):
    from orstack.vocab_trim import stage
    from orstack.vocab_trim.trim import VocabTrimConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(calib.read_text()[:2000], encoding="utf-8")
    runs = _runs(stage, random_llama, tmp_path, lambda: VocabTrimConfig(
        corpus=[str(corpus)], coverage=None, max_vocab=270, validate=str(corpus), max_length=64, force=True))
    streamed, memory = _state(runs[True][0]), _state(runs[False][0])
    assert streamed.keys() == memory.keys()
    assert all(torch.equal(streamed[n], memory[n]) for n in streamed)
    assert streamed["model.embed_tokens.weight"].shape[0] < TensorReader(random_llama).shape(
        "model.embed_tokens.weight")[0]
    ms, mm = runs[True][1].metrics, runs[False][1].metrics
    assert {k: v for k, v in ms.items() if k != "seconds"} == {k: v for k, v in mm.items() if k != "seconds"}
    cs, cm = (json.loads((runs[s][0] / "config.json").read_text()) for s in (True, False))
    assert cs == cm


def test_a_failed_gate_leaves_no_staging_behind(random_llama, calib, tmp_path):
    from orstack import prune
    from orstack.errors import GateFailed

    config = prune.PruneConfig(method="magnitude", sparsity=0.9, calib=[str(calib)], heldout=[str(calib)],
                               nsamples=2, seqlen=32, eval_length=64, max_ppl_rise=0.0)
    with pytest.raises(GateFailed):
        prune.run(random_llama, tmp_path / "out", config, Runtime(device="cpu"))
    assert list(tmp_path.iterdir()) == []
