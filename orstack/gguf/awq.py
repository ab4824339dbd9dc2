"""Packed 4-bit AWQ weights straight onto Q4_1 blocks, keeping AWQ's rounding decisions.

A compressed-tensors "pack-quantized" Linear stores, per group of `group` input weights,
a scale s and a zero point z, and 4-bit codes; its weight is (u - z') · s with u the
unsigned code (code + 8) and z' = z + 8 as stored. A Q4_1 block of 32 weights decodes as
d · q + m with q in 0..15. With group a multiple of 32 every block lies inside one group,
so d = s, m = -s · z', q = u reproduce the AWQ weight exactly, up to the fp16 rounding of
d and m: no dequantize-and-requantize step that could move a weight to another level.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

Q4_1_BLOCK = 32


def _unpack_nibbles(packed: np.ndarray, n: int, axis: int) -> np.ndarray:
    """int32 words holding 8 nibbles each (lowest first) -> uint8 values, `n` of them along `axis`."""
    import numpy as np

    words = np.moveaxis(packed.astype(np.int64) & 0xFFFFFFFF, axis, -1)
    nibbles = np.stack([(words >> (4 * k)) & 0xF for k in range(8)], axis=-1)
    values = nibbles.reshape(*words.shape[:-1], -1)[..., :n].astype(np.uint8)
    return np.moveaxis(values, -1, axis)


def q4_1_from_groups(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Unsigned codes [out, in], scale and unsigned zero point [out, in/group] -> Q4_1 bytes [out, in/32*20]."""
    import numpy as np

    out_f, in_f = codes.shape
    group = in_f // scale.shape[1]
    per_block = np.repeat(np.arange(scale.shape[1]), group // Q4_1_BLOCK)  # block -> its group
    s = scale[:, per_block].astype(np.float32)
    d = s.astype(np.float16)
    m = (-(s * zero[:, per_block].astype(np.float32))).astype(np.float16)
    q = codes.reshape(out_f, -1, Q4_1_BLOCK)
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8)
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1)
    return blocks.reshape(out_f, -1)


def awq_q4_1_weights(path: Path) -> dict[str, np.ndarray]:
    """HF weight name -> Q4_1 bytes for every packed 4-bit Linear whose group size is a multiple of 32."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    out: dict[str, np.ndarray] = {}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        out_f, in_f = (int(x) for x in state[f"{name}.weight_shape"].tolist())
        packed = state[key].numpy()
        scale = state[f"{name}.weight_scale"].float().numpy()
        if packed.shape[1] * 32 != in_f * 4 or in_f % scale.shape[1]:
            continue  # not 4-bit
        group = in_f // scale.shape[1]
        if group % Q4_1_BLOCK:
            continue
        codes = _unpack_nibbles(packed, in_f, axis=1)
        if f"{name}.weight_zero_point" in state:
            zero = _unpack_nibbles(state[f"{name}.weight_zero_point"].numpy(), out_f, axis=0)
        else:  # symmetric: code - 0, stored as u = code + 8
            zero = np.full(scale.shape, 8, dtype=np.uint8)
        out[f"{name}.weight"] = q4_1_from_groups(codes, scale, zero)
    return out
