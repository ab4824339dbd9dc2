"""`orstack awq --dry-run`: the per-tensor plan from the config and the safetensors headers."""

from __future__ import annotations

import math
from pathlib import Path

from orstack.awq.search import AWQConfig, check_config, largest_divisor
from orstack.errors import BadInput
from orstack.plan import Plan, TensorPlan, checkpoint_headers, keep_row, meta_tensors

STORE_BYTES = 4  # awq computes and stores in float32 (scales included): orstack/awq/stage.py


def plan(source: str | Path, config: AWQConfig) -> Plan:
    """What `orstack awq` would do to every tensor of `source`: the group size of each decoder
    Linear (and whether it divides the width), and the real bits per weight of the packed layout
    (codes + one scale, and a zero point unless --symmetric, per group; orstack/awq/packed.py)."""
    from orstack.architectures import check_config as check_architecture
    from orstack.architectures import layer_prefix, weightless_model
    from orstack.io.checkpoint import load_config, resolve_checkpoint
    from orstack.layerwise import decoder_layers, linear_modules

    check_config(config)
    checkpoint = resolve_checkpoint(source)
    if not isinstance(checkpoint, Path):
        raise BadInput(f"{source}: no such checkpoint directory")
    model_config = load_config(checkpoint)
    check_architecture(model_config, str(checkpoint))
    headers = checkpoint_headers(checkpoint)
    model = weightless_model(model_config)
    result = Plan("awq", str(source), bytes_in=sum(t.nbytes for t in headers.values()))
    if config.mixed_precision:
        result.notes.append(f"--mixed-precision: sizes shown at {config.bits} bits; the run moves about "
                            f"{config.promote_fraction:.0%} of the weights a bit up and as many down")
    targets = {}
    for index, layer in enumerate(decoder_layers(model)):
        prefix = layer_prefix(model, index)
        for name, module in linear_modules(layer).items():
            targets[f"{prefix}.{name}.weight"] = module.in_features
    misfits = []
    bits = config.bits
    for tensor, shape in meta_tensors(model).items():
        if tensor not in targets:
            result.tensors.append(keep_row(tensor, shape, STORE_BYTES))
            continue
        cols = targets[tensor]
        rows = math.prod(shape) // cols
        group = largest_divisor(cols, 128) if config.group_size == "auto" else config.group_size
        if cols % group:
            misfits.append(f"{tensor.rsplit('.', 2)[-2]} (width {cols})")
            result.tensors.append(TensorPlan(tensor, shape, f"int{bits} g{group}", 8.0 * STORE_BYTES,
                                             rows * cols * STORE_BYTES, f"{group} does not divide {cols}", False))
            continue
        groups = cols // group
        if config.fake_quant:
            stored, detail = rows * cols * STORE_BYTES, "dequantized (--fake-quant)"
        else:
            stored = rows * math.ceil(cols * bits / 32) * 4 + rows * groups * STORE_BYTES + 16
            if not config.symmetric:
                stored += math.ceil(rows * bits / 32) * groups * 4
            detail = "packed codes + scales" + ("" if config.symmetric else " + zero points")
        result.tensors.append(TensorPlan(tensor, shape, f"int{bits} g{group}", 8 * stored / (rows * cols),
                                         stored, detail))
    if misfits:
        result.error = (f"--group-size {config.group_size} does not divide the input width of "
                        f"{', '.join(sorted(set(misfits)))}; pick a divisor or use --group-size auto")
    return result
