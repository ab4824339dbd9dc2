"""`orstack prune --dry-run`: the per-tensor plan from the config and the safetensors headers."""

from __future__ import annotations

import math
from pathlib import Path

from orstack.errors import BadInput
from orstack.plan import (
    TORCH_DTYPE_BYTES,
    Plan,
    TensorPlan,
    checkpoint_headers,
    keep_row,
    meta_tensors,
    stored_float_bytes,
)
from orstack.prune.stage import PruneConfig


def plan(source: str | Path, config: PruneConfig) -> Plan:
    """What `orstack prune` would do to every tensor of `source`: the sparsity (or N:M pattern) of
    each decoder Linear, whether the pattern fits its input width, and the bytes stored (bitmask +
    kept values where that is smaller than dense, as orstack/prune/storage.py writes)."""
    from orstack.architectures import check_config as check_architecture
    from orstack.architectures import layer_prefix
    from orstack.io.checkpoint import load_config, resolve_checkpoint
    from orstack.layerwise import decoder_layers, linear_modules, weightless_model

    config.validate()
    checkpoint = resolve_checkpoint(source)
    if not isinstance(checkpoint, Path):
        raise BadInput(f"{source}: no such checkpoint directory")
    model_config = load_config(checkpoint)
    check_architecture(model_config, str(checkpoint))
    headers = checkpoint_headers(checkpoint)
    model = weightless_model(model_config)
    spec = config.spec()
    width = TORCH_DTYPE_BYTES[config.dtype]
    levels = config.grid or [spec.sparsity]
    result = Plan("prune", str(source), bytes_in=sum(t.nbytes for t in headers.values()))
    stored_width = stored_float_bytes(headers, model_config)
    if stored_width != width:
        result.notes.append(f"--dtype {config.dtype}: values stored in {width} bytes (the checkpoint holds "
                            f"{stored_width}-byte floats)")
    if config.grid:
        result.notes.append(f"--grid: sizes shown at {levels[0]:.2f}; the run tries {', '.join(map(str, levels))}")
    targets = {}
    for index, layer in enumerate(decoder_layers(model)):
        prefix = layer_prefix(model, index)
        for name, module in linear_modules(layer).items():
            targets[f"{prefix}.{name}.weight"] = (name, module.in_features)
    if config.prune_lm_head and getattr(model, "lm_head", None) is not None:
        targets["lm_head.weight"] = ("lm_head", model.lm_head.in_features)
    misfits = []
    for tensor, shape in meta_tensors(model).items():
        if tensor not in targets:
            result.tensors.append(keep_row(tensor, shape, width, "dense"))
            continue
        name, cols = targets[tensor]
        rows = math.prod(shape) // cols
        if spec.pattern is not None:
            n, m = spec.pattern
            fits = cols % m == 0
            kept = rows * (cols // m) * (m - n) if fits else rows * cols
            action, detail = f"prune {n}:{m}", "" if fits else f"input width {cols} is not a multiple of {m}"
            if not fits:
                misfits.append(f"{tensor} (width {cols})")
        else:
            fits = True
            sparsity = levels[0] if config.grid else spec.sparsity_for(name)
            kept = rows * (cols - math.floor(sparsity * cols))  # every output row loses the same count
            action, detail = f"prune {sparsity:.2f}", ""
        dense = rows * cols * width
        sparse = rows * math.ceil(cols / 8) + kept * width
        stored = min(dense, sparse) if config.compress and fits else dense
        if config.compress and fits:
            detail = "bitmask + values" if sparse < dense else "dense (sparse storage would be larger)"
        result.tensors.append(TensorPlan(tensor, shape, action, 8 * stored / (rows * cols), stored, detail, fits))
    if misfits:
        n, m = spec.pattern
        result.error = (f"--pattern {n}:{m}: input width of {', '.join(misfits[:4])}"
                        f"{f' and {len(misfits) - 4} more' if len(misfits) > 4 else ''} is not a multiple of {m}")
    return result
