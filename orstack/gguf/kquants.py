"""K-quants (Q4_K, Q5_K, Q6_K) in vectorised numpy, in llama.cpp's block layout.

The `gguf` package only dequantizes K-quants; llama.cpp makes them with its C++
`llama-quantize`. These functions follow the arithmetic of ggml's reference quantizers
(`quantize_row_q4_K_ref` and friends, no importance matrix) step by step in float32, so
the bytes come out identical: every reduction over a sub-block is accumulated in the
same sequential order as the C loop, because a pairwise (numpy) sum rounds differently
and can flip a scale search decision.

Arrays are laid out [weights-in-sub-block, sub-blocks] so each sequential accumulation
step is one contiguous vector operation over all sub-blocks of the tensor at once.

Block layouts (bytes):
  Q4_K (144): d f16, dmin f16, scales[12] (6-bit scale + 6-bit min per 32), qs[128]
  Q5_K (176): d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]
  Q6_K (210): ql[128], qh[64], scales[16] int8 (one per 16), d f16
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32


def _seqsum(terms: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Sum over axis 0 one term at a time (the C loop's order and rounding)."""
    acc = terms[0].copy() if start is None else start + terms[0]
    for t in terms[1:]:
        acc += t
    return acc


def _nearest_int(v: np.ndarray) -> np.ndarray:
    # ggml's nearest_int (the 1.5*2^23 trick) rounds half to even, like rint.
    return np.rint(v).astype(np.int32)


def _f16_round(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float32)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Asymmetric scale/min search for each column of x [n, B] (ggml's make_qkx2_quants).

    Returns (L uint8 [n, B], scale [B], the_min [B]) with x ~ scale * L - the_min."""
    n, nb = x.shape
    xmin = np.minimum(x.min(axis=0), F32(0))
    xmax = x.max(axis=0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = xmax == xmin
    rng = np.where(flat, F32(1), xmax - xmin)
    nmax_f = F32(nmax)

    iscale = nmax_f / rng
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - xmin)), 0, nmax).astype(np.float32)
    diff = scale * L + xmin - x
    best_error = _seqsum(w * (diff * diff))
    best_min = xmin.copy()
    for step in range(nstep + 1):
        # The C loop measures the range from the best min found so far, not the data min.
        rng = np.where(flat, F32(1), xmax - best_min)
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / rng
        laux = np.clip(_nearest_int(iscale * (x - best_min)), 0, nmax).astype(np.float32)
        wl = w * laux
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * laux)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_d = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), this_scale)
        diff = this_scale * laux + this_min - x
        cur_error = _seqsum(w * (diff * diff))
        better = ok & (cur_error < best_error)
        L = np.where(better, laux, L)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    L = np.where(flat, F32(0), L)
    scale = np.where(flat, F32(0), scale)
    best_min = np.where(flat, xmin, best_min)
    return L, scale, -best_min


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block into 12 bytes. ls, lm: [8, S] -> [S, 12]."""
    s = np.zeros((12, ls.shape[1]), dtype=np.uint8)
    s[0:4] = ls[0:4]
    s[4:8] = lm[0:4]
    s[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    s[0:4] |= (ls[4:8] >> 4) << 6
    s[4:8] |= (lm[4:8] >> 4) << 6
    return s.T


def _make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray):
    """Non-negative scale search under weights w for each column of x [n, B] (ggml's make_qp_quants,
    which quantizes the sub-block scales and mins of the importance-weighted K-quants).

    Returns (L int32 [n, B], scale [B])."""
    n, nb = x.shape
    xmax = np.maximum(x.max(axis=0), F32(0))
    zero = xmax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), xmax)
    nmax_f = F32(nmax)
    iscale = nmax_f / safe_max
    lvl = _nearest_int(iscale * x).astype(np.float32)
    diff = x - (F32(1) / iscale) * lvl
    best_mse = _seqsum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + nmax_f) / safe_max
        lvl = np.minimum(_nearest_int(iscale_is * x), nmax).astype(np.float32)
        diff = x - (F32(1) / iscale_is) * lvl
        mse = _seqsum(w * diff * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale)
    L = np.minimum(_nearest_int(iscale * x), nmax).astype(np.float32)
    wx = w * x
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum(w * L * L)
    # The C loop's coordinate descent, one position at a time over all columns at once; a pass
    # that changes nothing leaves the state as it was, so running all five passes is the same.
    for _ in range(5):
        for i in range(n):
            slx = sumlx - wx[i] * L[i]
            sl2 = suml2 - w[i] * L[i] * L[i]
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(_nearest_int(x[i] * sl2 / np.where(ok, slx, F32(1))), nmax).astype(np.float32)
            slx = slx + wx[i] * new_l
            sl2 = sl2 + w[i] * new_l * new_l
            take = ok & (new_l != L[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new_l, L[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    L = np.where(zero, F32(0), L)
    return L.astype(np.int32), np.where(zero, F32(0), scale)


def _tile_importance(importance: np.ndarray, shape: tuple[int, ...], block: int) -> np.ndarray:
    """Per-column importance [cols] -> one row per block of the flattened tensor [rows*cols/block, block]."""
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if imp.shape[0] != shape[-1]:
        raise ValueError(f"importance has {imp.shape[0]} columns, the tensor {shape[-1]}")
    rows = int(np.prod(shape[:-1]))
    return np.tile(imp.reshape(-1, block), (rows, 1))


def _qk_super_block(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    importance: np.ndarray | None = None, preset: tuple | None = None):
    """Shared by Q4_K and Q5_K: x [S, 256] -> (d f16 [S], dmin f16 [S], scales [S, 12], L [S, 256]).

    With `importance` [S, 256] (per-column activation importance, tiled per super-block) this is
    ggml's quantize_row_q4_K_impl / q5_K_impl: each error weighted by imp * sqrt(sigma2 + x^2), a
    wider scale search (make_qkx3_quants) and weighted 6-bit sub-block scales (make_qp_quants).
    `preset` (levels [32, S*8], scales [S*8], mins [S*8], x ~ scale * L - min per 32 weights)
    replaces the per-sub-block search with given decisions (AWQ's groups, orstack/gguf/awq.py);
    the 6-bit scale quantization and the final rounding against the stored scales stay."""
    S = x.shape[0]
    sub = x.reshape(S * 8, 32).T  # [32, S*8]
    if importance is None:
        if preset is not None:
            L, scales, mins = preset
        else:
            sum_x2 = _seqsum(sub * sub)
            av_x = np.sqrt(sum_x2 / F32(32))
            w = av_x + np.abs(sub)
            L, scales, mins = _make_qkx2_quants(sub, w, nmax, rmin, rdelta, nstep)
    else:
        xt = x.T  # [256, S]
        sigma2 = F32(2) * _seqsum(xt * xt) / F32(QK_K)  # [S]
        sigma2 = np.repeat(sigma2, 8)  # per sub-block column
        w = importance.reshape(S * 8, 32).T * np.sqrt(sigma2 + sub * sub)
        sw = _seqsum(w).reshape(S, 8).T  # [8, S]
        # make_qkx3_quants is make_qkx2_quants with these settings (its other differences only
        # guard non-finite inputs).
        L, scales, mins = preset if preset is not None else _make_qkx2_quants(sub, w, nmax, -0.9, 0.05, 36)
    scales = scales.reshape(S, 8).T  # [8, S]
    mins = mins.reshape(S, 8).T
    if importance is None:
        max_scale = np.maximum(scales.max(axis=0), F32(0))
        max_min = np.maximum(mins.max(axis=0), F32(0))
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(_nearest_int(inv_scale * scales).astype(np.uint8), 63)
        lm = np.minimum(_nearest_int(inv_min * mins).astype(np.uint8), 63)
        d16 = (max_scale / F32(63)).astype(np.float16)
        dmin16 = (max_min / F32(63)).astype(np.float16)
    else:
        ls, d_block = _make_qp_quants(scales, 63, sw)
        lm, m_block = _make_qp_quants(mins, 63, sw)
        ls, lm = np.minimum(ls, 63).astype(np.uint8), np.minimum(lm, 63).astype(np.uint8)
        d16, dmin16 = d_block.astype(np.float16), m_block.astype(np.float16)
    # Re-quantize every weight against the rounded (fp16, 6-bit) scales actually stored.
    d = d16.astype(np.float32) * ls.astype(np.float32)  # [8, S]
    dm = dmin16.astype(np.float32) * lm.astype(np.float32)
    xs = x.reshape(S, 8, 32).transpose(2, 1, 0)  # [32, 8, S]
    nonzero = d != 0
    q = np.clip(_nearest_int((xs + dm) / np.where(nonzero, d, F32(1))), 0, nmax)
    L = L.T.reshape(S, 8, 32).transpose(2, 1, 0)
    L = np.where(nonzero, q, L.astype(np.int32)).astype(np.uint8)  # d == 0 keeps the search's levels
    return d16, dmin16, _pack_scales_k4(ls, lm), L.transpose(2, 1, 0).reshape(S, 256)


def _as_super_blocks(data: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(data, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {QK_K}")
    return x.reshape(-1, QK_K)


def _out(blocks: np.ndarray, shape: tuple[int, ...], block_bytes: int) -> np.ndarray:
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * block_bytes)


def _importance(importance: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    return None if importance is None else _tile_importance(importance, shape, QK_K)


def quantize_q4_k(data: np.ndarray, importance: np.ndarray | None = None, preset: tuple | None = None) -> np.ndarray:
    """float rows (last axis a multiple of 256) -> Q4_K bytes [..., row_bytes]; `importance`
    [cols] weights each column's error (llama.cpp's imatrix); without it, ggml's reference bytes.
    `preset`: given sub-block decisions instead of the search (see _qk_super_block)."""
    x = _as_super_blocks(data)
    d16, dmin16, scales, L = _qk_super_block(x, 15, -1.0, 0.1, 20, _importance(importance, data.shape), preset)
    S = x.shape[0]
    # qs: each 64-weight chunk packs weights l (low nibble) and l+32 (high nibble).
    L4 = L.reshape(S, 4, 2, 32)
    qs = (L4[:, :, 0] | (L4[:, :, 1] << 4)).reshape(S, 128)
    out = np.concatenate([d16.reshape(S, 1).view(np.uint8), dmin16.reshape(S, 1).view(np.uint8), scales, qs], axis=1)
    return _out(out, data.shape, BLOCK_BYTES["Q4_K"])


def quantize_q5_k(data: np.ndarray, importance: np.ndarray | None = None, preset: tuple | None = None) -> np.ndarray:
    """float rows (last axis a multiple of 256) -> Q5_K bytes [..., row_bytes] (`importance`, `preset`: see Q4_K)."""
    x = _as_super_blocks(data)
    d16, dmin16, scales, L = _qk_super_block(x, 31, -0.5, 0.1, 15, _importance(importance, data.shape), preset)
    S = x.shape[0]
    L4 = L.reshape(S, 4, 2, 32)
    lo = L4 & 0xF
    hi = (L4 >> 4).astype(np.uint8)  # the 5th bit, one bit plane per 32 weights
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(S, 128)
    qh = np.zeros((S, 32), dtype=np.uint8)
    for chunk in range(4):
        qh |= hi[:, chunk, 0] << (2 * chunk)
        qh |= hi[:, chunk, 1] << (2 * chunk + 1)
    out = np.concatenate([d16.reshape(S, 1).view(np.uint8), dmin16.reshape(S, 1).view(np.uint8), scales, qh, qs],
                         axis=1)
    return _out(out, data.shape, BLOCK_BYTES["Q5_K"])


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int, weights: np.ndarray | None = None):
    """Symmetric scale search with weights x^2, or `weights` [n, B] (ggml's make_qx_quants, rmse_type 1).

    x [n, B] -> (L int32 in [0, 2*nmax) [n, B], scale [B])."""
    n, nb = x.shape
    idx = np.abs(x).argmax(axis=0)  # first occurrence of the largest |x|, like the C loop
    xmax = x[idx, np.arange(nb)]
    amax = np.abs(xmax)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), xmax)
    w = x * x if weights is None else weights
    wx = w * x

    def levels(iscale):
        return np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)

    iscale = F32(-nmax) / safe_max
    lvl = levels(iscale)
    lf = lvl.astype(np.float32)
    sumlx = _seqsum(wx * lf)
    suml2 = _seqsum(w * lf * lf)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / safe_max
        cand = levels(iscale)
        cf = cand.astype(np.float32)
        slx = _seqsum(wx * cf)
        sl2 = _seqsum(w * cf * cf)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        lvl = np.where(better, cand, lvl)
        scale = np.where(better, slx / np.where(sl2 > 0, sl2, F32(1)), scale)
        best = np.where(better, scale * slx, best)
    lvl = np.where(zero, -nmax, lvl)  # all-zero groups store level 0 (nmax + L = 0 in C)
    return lvl + nmax, np.where(zero, F32(0), scale)


def quantize_q6_k(data: np.ndarray, importance: np.ndarray | None = None, preset: tuple | None = None) -> np.ndarray:
    """float rows (last axis a multiple of 256) -> Q6_K bytes [..., row_bytes]. With `importance`
    [cols] the sub-block scale search weights each error by the importance alone (ggml's q6_K_impl).
    `preset` (levels 0..63 [16, S*16], scales [S*16], x ~ scale * (L - 32) per 16 weights)
    replaces that search; the 8-bit scale quantization and the final rounding stay."""
    x = _as_super_blocks(data)
    S = x.shape[0]
    sub = x.reshape(S * 16, 16).T  # [16, S*16]
    imp = _importance(importance, data.shape)
    if preset is not None:
        L, scales = preset
    else:
        L, scales = _make_qx_quants_rmse1(sub, 32, None if imp is None else imp.reshape(S * 16, 16).T)
    scales = scales.reshape(S, 16)
    L = L.T.reshape(S, 16, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(S), pick]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d16 = (F32(1) / iscale).astype(np.float16)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # [S, 16]
    nonzero = (d != 0)[:, :, None]
    q = np.clip(_nearest_int(x.reshape(S, 16, 16) / np.where(nonzero, d[:, :, None], F32(1))), -32, 31) + 32
    L = np.where(nonzero, q, L).astype(np.uint8).reshape(S, 2, 4, 32)  # [S, half, quarter, 32]
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(S, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    qh = qh.reshape(S, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.reshape(S, 1).view(np.uint8)], axis=1)
    out[empty] = 0
    return _out(out, data.shape, BLOCK_BYTES["Q6_K"])


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
