"""`orstack gguf --imatrix`: importance collection, importance-weighted quantizers (byte-identical
to ggml's own with the same importance), and the flag end to end in llama.cpp."""

from __future__ import annotations

import ctypes
import json
import os

import numpy as np
import pytest
from conftest import run_orstack

from orstack.gguf import kquants, legacy
from orstack.gguf.export import quantize

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

WEIGHTED = ["Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
CALIB = ("Calibration text is ordinary prose about many things: rivers, numbers such as 42 and 1999, "
         "a recipe with flour and salt, and a short story about a fox that crossed a lazy dog's path. ") * 6


def _ggml_quantize(x: np.ndarray, name: str, importance: np.ndarray | None) -> np.ndarray:
    """ggml_quantize_chunk from llama-cpp-python's libggml-base: llama-quantize's own routine."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    qt = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    lib.ggml_quantize_chunk(int(qt), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                            None if imp is None else imp.ctypes.data)
    return out


def _weights(rng, rows=24, cols=512):
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x[1, :40] = 0  # an all-zero block
    x[2] *= 20  # an outlier row
    x[3, 7] = 1.5  # an outlier weight
    return x


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_weighted_bytes_are_ggml_bytes_with_the_same_importance(name, kind):
    rng = np.random.default_rng(7)
    x = _weights(rng)
    imp = np.ones(x.shape[1], np.float32) if kind == "uniform" else (rng.random(x.shape[1]) ** 4 * 9).astype(np.float32)
    ours = quantize(x, name, imp)
    assert np.array_equal(ours, _ggml_quantize(x, name, imp))


@pytest.mark.parametrize("name", [*WEIGHTED, "Q8_0"])
def test_without_importance_the_bytes_stay_ggml_reference(name):
    x = _weights(np.random.default_rng(3))
    assert np.array_equal(quantize(x, name), _ggml_quantize(x, name, None))


def _weighted_error(x, blocks, name, imp):
    deq = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(x.shape)
    return float((imp[None, :] * (x - deq) ** 2).sum())


@pytest.mark.parametrize("name", [*WEIGHTED, "Q8_0"])
def test_importance_lowers_the_importance_weighted_error(name):
    """Property over random tensors: with importance, sum imp_j (x - q)^2 is no larger than without."""
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        x = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 0.2)).astype(np.float32)
        imp = (rng.lognormal(0, 1.5, x.shape[1])).astype(np.float32)
        with_imp = _weighted_error(x, quantize(x, name, imp), name, imp)
        without = _weighted_error(x, quantize(x, name), name, imp)
        assert with_imp <= without, (seed, with_imp, without)


def test_weighted_q8_0_keeps_the_reference_block_unless_the_search_is_better():
    """llama.cpp's Q8_0 ignores an imatrix; ours takes per block the better of its reference block
    and a weighted search, so no block is worse than llama.cpp's on the weighted error."""
    rng = np.random.default_rng(11)
    x = _weights(rng, rows=16, cols=256)
    imp = (rng.lognormal(0, 1.5, x.shape[1])).astype(np.float32)
    ours, ref = quantize(x, "Q8_0", imp), _ggml_quantize(x, "Q8_0", imp)
    assert np.array_equal(ref, _ggml_quantize(x, "Q8_0", None))  # llama.cpp: importance unused

    def block_errors(blocks):
        deq = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
        w = imp[None, :] * np.sqrt((x * x).mean(axis=1, keepdims=True) + x * x)
        return (w * (x - deq) ** 2).reshape(x.shape[0], -1, 32).sum(-1)

    ours_e, ref_e = block_errors(ours), block_errors(ref)
    assert np.all(ours_e <= ref_e * (1 + 1e-6))
    kept = (ours.reshape(-1, 34) == ref.reshape(-1, 34)).all(axis=1)
    assert (ours_e < ref_e).sum() > 0 and kept.sum() + (ours_e.reshape(-1) < ref_e.reshape(-1)).sum() == kept.size


def _quantized_by_llama_cpp(random_llama, tmp_path, qtype, calib, pure):
    from orstack.gguf.export import export_gguf, importance_by_gguf_name
    from orstack.gguf.imatrix import collect_importance
    from orstack.gguf.validate import llama_cpp_quantize
    from orstack.io.checkpoint import load_model

    model, tok = load_model(str(random_llama))
    importance = collect_importance(model, tok, calib)
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / f"ours-{qtype}.gguf", tmp_path / f"theirs-{qtype}.gguf"
    if not f32.exists():
        export_gguf(model, tok, f32, "f32", progress=False)
    export_gguf(model, tok, ours, qtype, progress=False, importance=importance)
    llama_cpp_quantize(f32, theirs, qtype, importance=importance_by_gguf_name(model, importance), pure=pure)
    return ({t.name: t for t in gguf.GGUFReader(str(ours)).tensors},
            {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors})


@pytest.mark.parametrize(("qtype", "pure"), [("q4_k_m", False), pytest.param("q4_0", True, marks=pytest.mark.slow),
                                             pytest.param("q4_1", True, marks=pytest.mark.slow)])
def test_same_importance_gives_llama_cpps_bytes_for_the_whole_file(random_llama, tmp_path, qtype, pure):
    """llama.cpp's own quantizer (llama_model_quantize, given our importance the way llama-quantize
    --imatrix gives its file) on our f32 export writes the same tensors as `orstack gguf --imatrix`;
    only Q8_0 tensors may differ, where llama.cpp drops the importance."""
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB, encoding="utf-8")
    ours, theirs = _quantized_by_llama_cpp(random_llama, tmp_path, qtype, calib, pure)
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    compared = [n for n, t in ours.items() if t.tensor_type.name not in ("F32", "Q8_0")]
    assert len(compared) >= 2 * 7
    for name in compared:
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data)), name


def test_collected_importance_is_the_mean_squared_input_of_each_linear(random_llama, tmp_path):
    import torch

    from orstack.gguf.imatrix import calibration_ids, collect_importance
    from orstack.io.checkpoint import load_model

    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB, encoding="utf-8")
    model, tok = load_model(str(random_llama))
    imp = collect_importance(model, tok, calib)
    ids = calibration_ids(tok, calib, model.config.max_position_embeddings)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(_m, args, _out, name=name):
                a = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = (a * a).mean(0)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert set(imp.values) == {f"{n}.weight" for n in sums}
    for name, ref in sums.items():
        np.testing.assert_allclose(imp.values[f"{name}.weight"], ref.numpy(), rtol=1e-4, atol=1e-7)
    assert imp.n_tokens == ids.numel() and len(imp.sha256) == 64


def test_gguf_with_imatrix_runs_in_llama_cpp_and_names_its_calibration(random_llama, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB, encoding="utf-8")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    for out, extra in ((plain, []), (weighted, ["--imatrix", str(calib)])):
        r = run_orstack("gguf", str(random_llama), "-o", str(out), "--type", "q4_k_m", "--no-validate", *extra)
        assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(str(weighted))

    def field(key):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else bytes(f.parts[-1]).decode()

    assert field("quantize.imatrix.file") == str(calib)
    manifest = json.loads(field("orstack.manifest"))
    from orstack.gguf.imatrix import file_sha256

    assert manifest["imatrix"]["sha256"] == file_sha256(calib) and manifest["imatrix"]["tokens"] > 0
    # the importance itself, by digest: recomputed from the same model and text it is the same
    from orstack.gguf.imatrix import collect_importance
    from orstack.io.checkpoint import load_model

    model, tok = load_model(str(random_llama))
    digest = collect_importance(model, tok, calib).digest()
    assert field("orstack.imatrix.sha256") == digest == manifest["imatrix"]["importance_sha256"]
    plain_tensors = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(plain)).tensors}
    changed = [t.name for t in reader.tensors if t.tensor_type.name in ("Q4_K", "Q6_K")
               and bytes(t.data) != plain_tensors[t.name]]
    assert len(changed) >= 5  # the importance reached the quantizers
    llm = llama_cpp.Llama(model_path=str(weighted), n_ctx=64, verbose=False, n_threads=1)
    try:
        out = llm("The fox", max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] >= 1


def test_imatrix_bad_input(random_llama, tmp_path):
    out = tmp_path / "x.gguf"
    base = ("gguf", str(random_llama), "-o", str(out))
    r = run_orstack(*base, "--type", "f16", "--imatrix", str(random_llama / "config.json"))
    assert r.returncode == 2 and "--imatrix" in r.stderr and not out.exists()
    r = run_orstack(*base, "--type", "bf16", "--imatrix", str(random_llama / "config.json"))
    assert r.returncode == 2 and "--imatrix" in r.stderr and not out.exists()
    r = run_orstack(*base, "--type", "q4_k", "--imatrix", str(tmp_path / "none.txt"))
    assert r.returncode == 2 and "none.txt" in r.stderr and not out.exists()


def test_importance_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="columns"):
        kquants.quantize_q4_k(np.zeros((2, 256), np.float32), np.ones(128, np.float32))
    with pytest.raises(ValueError, match="no importance-weighted"):
        legacy.quantize_weighted(np.zeros((2, 32), np.float32), "F16", np.ones(32, np.float32))
