"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 with an importance matrix, in vectorised numpy (ggml's
quantize_row_q4_0_impl and friends). Without importance these types come from
`gguf.quants.quantize`, whose bytes are ggml's reference quantizers'.

Q8_0 takes no importance in llama.cpp (its scale is amax/127, whatever the imatrix): here
each block keeps that reference block or a weighted symmetric search (make_qx_quants with
levels -128..127, as Q4_0/Q5_0 search), whichever has the smaller weighted error, so with
importance a Q8_0 tensor differs from llama.cpp's only where the importance says it is better.

Each element's squared error is weighted by imp[col] * sqrt(sigma2 + x^2), sigma2 the row's
mean square; Q4_0/Q5_0 search a symmetric scale (make_qx_quants), Q4_1/Q5_1 a scale and min
(make_qkx3_quants). Blocks of 32 are columns of a [32, blocks] array, as in kquants.py, with
every reduction accumulated in the C loop's order.
"""

from __future__ import annotations

import numpy as np

from orstack.gguf.kquants import F32, _make_qkx2_quants, _make_qx_quants_rmse1, _seqsum, _tile_importance

QK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def _weighted_blocks(data: np.ndarray, importance: np.ndarray):
    """-> x [32, B] and weights [32, B], B = rows * cols / 32 in row-major block order."""
    x2d = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    if x2d.shape[1] % QK:
        raise ValueError(f"row length {x2d.shape[1]} is not a multiple of {QK}")
    n_per_row = x2d.shape[1]
    xt = x2d.T
    sigma2 = _seqsum(xt * xt) / F32(n_per_row)  # [rows]
    x = x2d.reshape(-1, QK).T
    sigma2 = np.repeat(sigma2, n_per_row // QK)
    w = _tile_importance(importance, data.shape, QK).T * np.sqrt(sigma2 + x * x)
    return x, w


def _nibbles(L: np.ndarray) -> np.ndarray:
    """L [32, B] levels -> qs [B, 16]: element j in the low nibble, j + 16 in the high one."""
    lo = (L[:16] & 0xF).astype(np.uint8)
    hi = (L[16:] & 0xF).astype(np.uint8)
    return (lo | (hi << 4)).T


def _fifth_bits(L: np.ndarray) -> np.ndarray:
    """L [32, B] -> qh [B, 4]: bit j is element j's fifth bit (little-endian uint32)."""
    bits = ((L >> 4) & 1).astype(np.uint32)
    qh = np.zeros(L.shape[1], dtype=np.uint32)
    for j in range(QK):
        qh |= bits[j] << np.uint32(j)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_weighted(data: np.ndarray, ggml_type: str, importance: np.ndarray) -> np.ndarray:
    """float [rows, cols] -> `ggml_type` bytes [rows, row_bytes] with per-column `importance`."""
    x, w = _weighted_blocks(data, importance)
    if ggml_type in ("Q4_0", "Q5_0"):
        nmax = 8 if ggml_type == "Q4_0" else 16
        L, d = _make_qx_quants_rmse1(x, nmax, w)
        parts = [_f16_bytes(d)] + ([_fifth_bits(L)] if ggml_type == "Q5_0" else []) + [_nibbles(L)]
    elif ggml_type in ("Q4_1", "Q5_1"):
        nmax = 15 if ggml_type == "Q4_1" else 31
        L, d, the_min = _make_qkx2_quants(x, w, nmax, -0.9, 0.05, 36)  # make_qkx3_quants' settings
        L = L.astype(np.int32)
        parts = [_f16_bytes(d), _f16_bytes(-the_min)] + ([_fifth_bits(L)] if ggml_type == "Q5_1" else []) \
            + [_nibbles(L)]
    elif ggml_type == "Q8_0":
        L, d = _make_qx_quants_rmse1(x, 128, w)
        searched = np.concatenate([_f16_bytes(d), (L - 128).astype(np.int8).T.view(np.uint8)], axis=1)
        import gguf

        reference = gguf.quants.quantize(np.ascontiguousarray(data, np.float32).reshape(-1, data.shape[-1]),
                                         gguf.GGMLQuantizationType.Q8_0)
        chosen = best_blocks(x, w, [reference.reshape(-1, BLOCK_BYTES["Q8_0"]), searched], "Q8_0")
        return chosen.reshape(*data.shape[:-1], data.shape[-1] // QK * BLOCK_BYTES["Q8_0"])
    else:
        raise ValueError(f"no importance-weighted quantizer for {ggml_type}")
    out = np.concatenate(parts, axis=1)
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK * BLOCK_BYTES[ggml_type])


def best_blocks(x: np.ndarray, w: np.ndarray, candidates: list[np.ndarray], ggml_type: str) -> np.ndarray:
    """Per block, the candidate with the smallest weighted squared error sum w (x - deq)^2.

    x, w [block, B] (blocks as columns, row-major block order); each candidate [B, block_bytes]
    of `ggml_type` -> [B, block_bytes]; ties keep the earlier candidate."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    errors = []
    for blocks in candidates:
        deq = gguf.quants.dequantize(np.ascontiguousarray(blocks), qtype).reshape(-1, x.shape[0]).T
        errors.append(((x - deq) ** 2 * w).sum(axis=0))
    pick = np.argmin(np.stack(errors), axis=0)
    return np.stack(candidates)[pick, np.arange(x.shape[1])]


WEIGHTED = tuple(BLOCK_BYTES)
