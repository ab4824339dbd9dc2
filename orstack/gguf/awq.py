"""AWQ's packed groups carried into GGUF blocks, keeping AWQ's rounding decisions.

A compressed-tensors "pack-quantized" Linear (orstack/awq/packed.py) stores, per group of
`group` input weights, a scale s and an unsigned zero point z, and unsigned b-bit codes u; its
weight is (u - z) · s, AWQ's per-channel scaling already folded in. Every GGUF type orstack
writes decodes a block as (level - offset) · d (- m), so a block lying inside one group takes
the group's scale and AWQ's codes directly instead of re-rounding the dequantized weights:

  exact (up to the fp16 rounding of d and m), blocks of 32 inside one group:
    Q4_1, Q5_1   d = s, m = -s·z, level = u
    Q4_0, Q5_0   d = s, level = u - z + 8 (16): where every level fits (symmetric 4-bit AWQ
                 for Q4_0; any 4-bit AWQ for Q5_0, SmolLM2's Q4_K fallback)
    Q8_0         d = s, level = u - z
  K-quants (256-weight super-blocks of 32- or 16-weight sub-blocks), sub-block scale s / k,
  min s·z, levels k·u (k = 2 for Q5_K, whose levels reach 31, and for Q6_K's 6-bit levels):
    the sub-block scales and mins are themselves quantized to 6 bits (Q4_K, Q5_K) or 8 bits
    (Q6_K) against one fp16 scale per super-block, so the stored scale is s only
    approximately; every weight is then rounded against the scale actually stored, as
    ggml's quantizers do after their own search.

For the K-quants, `mode` chooses: "map" (AWQ's groups as above), "requantize" (the type's own
search on the dequantized AWQ weights, importance-weighted when there is an importance) or
"best" (per super-block, whichever of the two reproduces the AWQ weight with the smaller
importance-weighted squared error; the default). The exact types always map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MODES = ("best", "map", "requantize")
EXACT = {"Q4_1": (0, 15, False), "Q5_1": (0, 31, False), "Q4_0": (8, 15, True), "Q5_0": (16, 31, True),
         "Q8_0": (0, 0, True)}  # type -> (level offset, max level, level is u - z), blocks of 32
K_SUB = {"Q4_K": (32, 15), "Q5_K": (32, 31), "Q6_K": (16, 31)}  # sub-block size, max |level| span


@dataclass
class AwqWeight:
    """One packed Linear as stored: codes and zero points still packed, scales as floats."""

    packed: np.ndarray  # int32 [out, in*bits/32]
    scale: np.ndarray  # float32 [out, groups]
    zero_packed: np.ndarray | None  # int32 [out*bits/32, groups]; None: symmetric
    shape: tuple[int, int]
    bits: int

    @property
    def group(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    def codes(self) -> np.ndarray:
        """Unsigned codes u [out, in]."""
        return unpack(self.packed, self.shape[1], self.bits, axis=1)

    def zeros(self) -> np.ndarray:
        """Unsigned zero points z [out, groups] (symmetric: 2^(bits-1))."""
        import numpy as np

        if self.zero_packed is None:
            return np.full(self.scale.shape, 1 << (self.bits - 1), dtype=np.int32)
        return unpack(self.zero_packed, self.shape[0], self.bits, axis=0)

    def dequantize(self) -> np.ndarray:
        import numpy as np

        per_col = np.repeat(np.arange(self.scale.shape[1]), self.group)
        return ((self.codes() - self.zeros()[:, per_col]) * self.scale[:, per_col]).astype(np.float32)


def unpack(packed: np.ndarray, n: int, bits: int, axis: int) -> np.ndarray:
    """int32 words holding values of `bits` bits densely, lowest bit first -> int32, `n` along `axis`."""
    import numpy as np

    words = np.ascontiguousarray(np.moveaxis(packed, axis, -1)).astype("<i4")
    bitplanes = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    bitplanes = bitplanes[..., : n * bits].reshape(*words.shape[:-1], n, bits).astype(np.int32)
    values = (bitplanes << np.arange(bits, dtype=np.int32)).sum(axis=-1)
    return np.moveaxis(values, -1, axis)


def read_awq(path: Path) -> dict[str, AwqWeight]:
    """HF weight name -> AwqWeight for every packed Linear of a pack-quantized checkpoint."""
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(_load(f, load_file))
    out: dict[str, AwqWeight] = {}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        if f"{name}.weight_shape" not in state or f"{name}.weight_scale" not in state:
            continue
        out_f, in_f = (int(x) for x in state[f"{name}.weight_shape"].tolist())
        packed = state[key]
        scale = state[f"{name}.weight_scale"].astype("float32")
        bits = next((b for b in range(2, 9) if -(-in_f * b // 32) == packed.shape[1]), 0)
        if not bits or in_f % scale.shape[1]:
            continue  # a layout this reader does not know: the weight is requantized from its float values
        out[f"{name}.weight"] = AwqWeight(packed, scale, state.get(f"{name}.weight_zero_point"), (out_f, in_f), bits)
    return out


def _load(f: Path, load_file):  # noqa: ANN001, ANN202 - safetensors numpy dict
    """safetensors.numpy cannot read bf16: those tensors are read through torch and upcast."""
    try:
        return load_file(str(f))
    except (TypeError, ValueError):
        from safetensors.torch import load_file as load_torch

        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in load_torch(str(f)).items()}


def mapping(w: AwqWeight, ggml_type: str) -> str | None:
    """How `w` maps onto `ggml_type` blocks: "exact", "k-quant", or None (not at all)."""
    if ggml_type in EXACT:
        if w.group % 32:
            return None
        offset, top, signed = EXACT[ggml_type]
        span = (1 << w.bits) - 1
        if ggml_type == "Q8_0":
            return "exact" if w.bits <= 7 or w.zero_packed is None else None
        if not signed:
            return "exact" if span <= top else None
        # u - z + offset must lie in 0..top: checked on the actual zero points
        return "exact" if span <= top and _levels_fit(w, offset, top) else None
    if ggml_type in K_SUB:
        sub, top = K_SUB[ggml_type]
        if w.group % sub or w.shape[1] % 256:
            return None
        span = (1 << w.bits) - 1
        if ggml_type == "Q6_K":
            return "k-quant" if span <= 31 else None  # levels (u - z) · k + 32 within 0..63
        return "k-quant" if span <= top else None
    return None


def _levels_fit(w: AwqWeight, offset: int, top: int) -> bool:
    import numpy as np

    z = w.zeros()
    lo, hi = 0 - z + offset, (1 << w.bits) - 1 - z + offset
    return bool(np.all(lo >= 0) and np.all(hi <= top))


def _per_block(values: np.ndarray, group: int, block: int) -> np.ndarray:
    """[out, groups] -> [out * in/block] (each block's group value, row-major block order)."""
    import numpy as np

    return np.repeat(values, group // block, axis=1).reshape(-1)


def exact_blocks(w: AwqWeight, ggml_type: str) -> np.ndarray:
    """AWQ's groups as `ggml_type` bytes [out, row_bytes] (mapping(w, ggml_type) == "exact")."""
    import numpy as np

    from orstack.gguf.legacy import BLOCK_BYTES, QK, _f16_bytes, _fifth_bits, _nibbles

    offset, _, signed = EXACT[ggml_type]
    u = w.codes()
    z = np.repeat(w.zeros(), w.group, axis=1)
    levels = (u - z + offset) if signed else u
    L = levels.reshape(-1, QK).T  # [32, B]
    s = _per_block(w.scale, w.group, QK)
    if ggml_type == "Q8_0":
        parts = [_f16_bytes(s), L.astype(np.int8).T.view(np.uint8)]
    elif ggml_type in ("Q4_0", "Q5_0"):
        parts = [_f16_bytes(s)] + ([_fifth_bits(L)] if ggml_type == "Q5_0" else []) + [_nibbles(L)]
    else:
        m = -(s * _per_block(w.zeros().astype(np.float32), w.group, QK))
        parts = [_f16_bytes(s), _f16_bytes(m)] + ([_fifth_bits(L)] if ggml_type == "Q5_1" else []) + [_nibbles(L)]
    return np.concatenate(parts, axis=1).reshape(w.shape[0], w.shape[1] // QK * BLOCK_BYTES[ggml_type])


def kquant_blocks(w: AwqWeight, ggml_type: str, data: np.ndarray, importance: np.ndarray | None = None,
                  ) -> np.ndarray:
    """AWQ's groups as the sub-block decisions of a K-quant (mapping(w, ggml_type) == "k-quant");
    `data` is the dequantized AWQ weight [out, in] the stored levels are rounded against."""
    import numpy as np

    from orstack.gguf import kquants

    sub, top = K_SUB[ggml_type]
    u = w.codes().astype(np.float32)
    zeros = w.zeros()
    span = (1 << w.bits) - 1
    if ggml_type == "Q6_K":  # symmetric levels: (u - z) · k + 32 in 0..63
        k = 1 << max(0, (63 // (2 * span)).bit_length() - 1)
        z = np.repeat(zeros, w.group, axis=1)
        L = ((u - z) * k + 32).astype(np.int32).reshape(-1, sub).T
        scales = _per_block(w.scale / k, w.group, sub)
        return kquants.quantize_q6_k(data, importance, preset=(L, scales.astype(np.float32)))
    k = 1 << max(0, (top // span).bit_length() - 1)
    L = (u * k).reshape(-1, sub).T
    scales = _per_block(w.scale / k, w.group, sub).astype(np.float32)
    mins = _per_block(w.scale * zeros, w.group, sub).astype(np.float32)
    return kquants.QUANTIZERS[ggml_type](data, importance, preset=(L, scales, mins))


def carry(w: AwqWeight, ggml_type: str, data: np.ndarray, importance: np.ndarray | None = None,
          mode: str = "best") -> tuple[np.ndarray, str] | None:
    """`ggml_type` bytes [out, row_bytes] for the AWQ weight `w` (its float values `data`, in the
    checkpoint's row order) and a note saying how, or None when the layout does not map."""
    import numpy as np

    from orstack.gguf.export import quantize

    how = mapping(w, ggml_type)
    if how is None:
        return None
    if how == "exact":
        return exact_blocks(w, ggml_type), f"AWQ groups mapped exactly onto {ggml_type}"
    if mode == "requantize":
        return None
    mapped = kquant_blocks(w, ggml_type, data, importance)
    if mode == "map":
        return mapped, f"AWQ groups mapped onto {ggml_type} sub-blocks"
    from orstack.gguf.kquants import BLOCK_BYTES, QK_K
    from orstack.gguf.legacy import best_blocks

    searched = quantize(data, ggml_type, importance)
    imp = np.ones(data.shape[1], np.float32) if importance is None else np.asarray(importance, np.float32)
    x = data.reshape(-1, QK_K).T
    weights = np.tile(imp.reshape(-1, QK_K), (data.shape[0], 1)).T
    nbytes = BLOCK_BYTES[ggml_type]
    chosen = best_blocks(x, weights, [mapped.reshape(-1, nbytes), searched.reshape(-1, nbytes)], ggml_type)
    n_mapped = int((chosen == mapped.reshape(-1, nbytes)).all(axis=1).sum())
    note = f"AWQ groups mapped onto {ggml_type} in {n_mapped} of {chosen.shape[0]} super-blocks (the rest searched)"
    return chosen.reshape(mapped.shape), note
