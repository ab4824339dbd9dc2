"""`distill train --recover` on a compressed student keeps the compression: pruned weights stay
exactly zero, every weight of an awq student stays on its grid, the output is in the format the
student was read in and loads through orstack's loader, and the loss on the trained rows falls
(measured on the model as saved). benchmarks/recover.py measures it on the tiny default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orstack.runtime import Runtime

RUNTIME = Runtime(device="cpu", threads=1, stream=False)


def rows_file(path: Path, n: int = 24) -> Path:
    words = ["abc", "dcba", "fox", "lazy", "quick", "jugs", "box", "dog"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            w = words[i % len(words)]
            f.write(json.dumps({"id": i, "prompt": f"rev {w}=", "response": w[::-1]}) + "\n")
    return path


def prune(source: Path, out: Path, calib: Path) -> Path:
    from orstack.prune import run
    from orstack.prune.stage import PruneConfig

    run(source, out, PruneConfig(sparsity=0.5, nsamples=4, seqlen=32, calib=[str(calib)], force=True), RUNTIME)
    return out


def quantize(source: Path, out: Path, *, group: int = 64, symmetric: bool = False) -> Path:
    from orstack.awq import run
    from orstack.awq.search import AWQConfig

    run(source, out, AWQConfig(rtn=True, group_size=group, symmetric=symmetric, force=True), RUNTIME)
    return out


def recover(student: Path, out: Path, data: Path, *, steps: int = 3, lr: float = 1e-2, mode: str = "qat"):
    from orstack.distill.train import DistillTrainConfig, run_train
    from orstack.train.config import TrainConfig

    config = DistillTrainConfig(data=str(data), train=TrainConfig(max_steps=steps, lr=lr, batch_size=8, lora_rank=4),
                                recover=True, recover_fraction=1.0, recover_mode=mode)
    return run_train(str(student), out, config, RUNTIME)


def decoder_weights(path: Path) -> dict[str, object]:
    from orstack.architectures import layer_prefix
    from orstack.io.checkpoint import load_model
    from orstack.layerwise import decoder_layers, linear_modules

    model, _ = load_model(path, with_tokenizer=False)
    return {f"{layer_prefix(model, i)}.{n}": m.weight.detach().clone()
            for i, layer in enumerate(decoder_layers(model)) for n, m in linear_modules(layer).items()}


@pytest.fixture(scope="module")
def compressed(random_llama, sample_text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    pruned = prune(random_llama, root / "pruned", sample_text_file)
    return {"root": root, "pruned": pruned, "pruned-awq": quantize(pruned, root / "pruned-awq"),
            "awq": quantize(random_llama, root / "awq", symmetric=True), "data": rows_file(root / "rows.jsonl")}


def test_recovered_sparse_student_keeps_every_pruned_weight_zero(compressed):
    from orstack.io.checkpoint import detect_format

    out = compressed["root"] / "rec-sparse"
    result = recover(compressed["pruned"], out, compressed["data"])
    assert result.kind == "sparse" and detect_format(out) == detect_format(compressed["pruned"])
    before, after = decoder_weights(compressed["pruned"]), decoder_weights(out)
    changed = 0
    for name, w0 in before.items():
        pruned = w0 == 0
        assert pruned.float().mean() >= 0.45, name
        assert not bool(after[name][pruned].any()), f"{name}: a pruned weight moved"
        changed += int((after[name] != w0).sum())
    assert changed > 0  # the recovery did train the kept weights
    assert result.metrics["recover_base"]["pruned_zeros_kept"] == sum(int((w == 0).sum()) for w in before.values())
    # the loss of the same rows, on the model as saved (pruned weights zero), falls
    assert result.metrics["recover_loss_all_after"] < result.metrics["recover_loss_all"] - 0.1


@pytest.mark.parametrize(("student", "mode"), [("pruned-awq", "qat"), ("pruned-awq", "round"), ("awq", "qat")])
def test_recovered_packed_student_stays_on_its_grid_and_keeps_its_zeros(compressed, student, mode):
    from orstack.distill.recover import SPARSE_PACKED, read_grids
    from orstack.io.checkpoint import detect_format, load_model

    out = compressed["root"] / f"rec-{student}-{mode}"
    # a large step so that weights do cross grid points
    result = recover(compressed[student], out, compressed["data"], steps=3, lr=5e-2, mode=mode)
    fmt = detect_format(compressed[student])  # prune -> awq: the sparse 4-bit layout where awq writes it
    assert detect_format(out) == fmt
    assert result.kind == ("sparse-packed" if fmt == SPARSE_PACKED else "packed")
    assert result.metrics["recover_base"]["pruned"] == (student != "awq")
    grids_in, grids_out = read_grids(compressed[student]), read_grids(out)
    assert grids_in.keys() == grids_out.keys() and grids_in
    before, after = decoder_weights(compressed[student]), decoder_weights(out)
    pruned = {n: w == 0 for n, w in decoder_weights(compressed["pruned"]).items()}  # what prune zeroed
    moved = 0
    for name, grid in grids_in.items():
        out_grid = grids_out[name]
        assert out_grid.spec == grid.spec  # same bits, group size, symmetry
        assert json.dumps(out_grid.scale.tolist()) == json.dumps(grid.scale.tolist())
        if grid.zero_point is None:  # a symmetric grid has no zero point
            assert out_grid.zero_point is None
        else:
            assert (out_grid.zero_point == grid.zero_point).all()
        w = after[name]
        assert (grid.snap(w) == w).all(), f"{name}: off the grid"
        if student != "awq":  # (kept weights that rounding made zero may move: they were not pruned)
            assert not bool(w[pruned[name]].any()), f"{name}: a pruned weight moved"
        moved += int((w != before[name]).sum())
    assert moved > 0
    if mode == "qat":  # the same rows, on the model as saved (on its grid): the loss falls
        assert result.metrics["recover_loss_all_after"] < result.metrics["recover_loss_all"] - 0.1
    model, _ = load_model(out, with_tokenizer=False)  # orstack's loader, the packed format
    assert model.config.model_type == "llama"


def test_qat_wrapper_starts_exactly_at_the_base_and_folds_onto_the_grid():
    import torch

    from orstack.awq.grid import QuantSpec, quantize
    from orstack.distill.recover import Grid
    from orstack.train.recover import Kept, attach, fold, verify

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight[:, ::2] = 0  # half pruned
    q = quantize(lin.weight.detach(), QuantSpec(4, 32, False))
    with torch.no_grad():
        lin.weight.copy_(q.dequantize())
    w0 = lin.weight.detach().clone()
    grid = Grid(q.spec, q.scale, q.zero_point)
    assert torch.equal(grid.snap(w0), w0)
    model = torch.nn.Sequential(lin)
    kept = {"0": Kept(keep=w0 != 0, snap=grid.snap)}
    attach(model, kept, rank=2, alpha=4, mode="qat")
    x = torch.randn(5, 64)
    assert torch.equal(model(x), x @ w0.T)  # B = 0: the model starts as the base, bit for bit
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(5):
        loss = (model(x) - 3.0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    fold(model)
    assert isinstance(model[0], torch.nn.Linear)
    counts = verify(model, kept)
    assert counts["pruned_zeros_kept"] == int((w0 == 0).sum()) and counts["weights_on_grid"] == w0.numel()
    assert not torch.equal(model[0].weight, w0)
