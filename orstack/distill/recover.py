"""`distill train --recover` on a compressed student: what the base keeps, and writing the
recovered model back in the base's format.

A student stored sparsely by `prune` (orstack-sparse-bitmask) keeps its zeros: every exact
zero of a decoder Linear stays zero. A student stored by `awq` (compressed-tensors
pack-quantized, or its sparse 4-bit layout) keeps its grid: each packed Linear's scales and
zero points are read from the checkpoint and the recovered weights are rounded onto that same
grid (same bits, group size and symmetry, same scales). Its pruned weights stay zero too: those
the sparse 4-bit layout's masks leave out, or, in a dense pack-quantized file whose lineage
holds a prune step, every exact zero (zeros that rounding made are kept with them, since the
stored codes cannot tell the two apart). The LoRA itself is orstack.train.recover.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from orstack.awq.grid import QuantSpec
    from orstack.train.recover import Kept

SPARSE = "orstack-sparse-bitmask"
PACKED = "compressed-tensors-pack-quantized"
SPARSE_PACKED = "orstack-sparse-pack-quantized"  # awq of a sparse prune output (orstack/awq/packed.py)
FORMATS = (SPARSE, PACKED, SPARSE_PACKED)


@dataclass
class Grid:
    """The fixed quantization grid of one packed Linear."""

    spec: QuantSpec
    scale: torch.Tensor  # [out, in/group]
    zero_point: torch.Tensor | None  # int8 [out, in/group]; None when symmetric

    def codes(self, w: torch.Tensor):  # noqa: ANN201 - Quantized
        from orstack.awq.grid import quantize_on

        return quantize_on(w, self.scale.to(w.dtype), self.zero_point, self.spec)

    def snap(self, w: torch.Tensor) -> torch.Tensor:
        return self.codes(w).dequantize(w.dtype)


@dataclass
class CompressedBase:
    """The format a student was read in and what recovery must keep, per Linear."""

    format: str  # one of FORMATS
    kept: dict[str, Kept]
    grids: dict[str, Grid] = field(default_factory=dict)
    pruned: bool = False
    stored_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # SPARSE_PACKED: by weight name

    def describe(self) -> dict[str, Any]:
        specs = sorted({(g.spec.bits, g.spec.group_size, g.spec.symmetric) for g in self.grids.values()})
        return {"format": self.format, "pruned": self.pruned, "linears": len(self.kept),
                "grids": [{"bits": b, "group_size": gs, "symmetric": s} for b, gs, s in specs]}


def compressed_base(student: str | Path, model: nn.Module) -> CompressedBase | None:
    """What `model` (loaded from `student`) must keep, or None when the student is not stored
    in a compressed format orstack writes."""
    from orstack.io.checkpoint import detect_format, resolve_checkpoint
    from orstack.layerwise import decoder_layers, linear_modules
    from orstack.train.recover import Kept

    source = resolve_checkpoint(student)
    if not isinstance(source, Path) or not source.is_dir():
        return None
    fmt = detect_format(source)
    if fmt not in FORMATS:
        return None
    grids = read_grids(source) if fmt != SPARSE else {}
    stored: dict[str, torch.Tensor] = {}
    if fmt == SPARSE_PACKED:
        from orstack.io.checkpoint import open_weights

        stored = open_weights(source).masks()
    pruned = fmt != PACKED or _lineage_pruned(source)
    from orstack.architectures import layer_prefix

    kept: dict[str, Kept] = {}
    for index, layer in enumerate(decoder_layers(model)):
        prefix = layer_prefix(model, index)
        for name, module in linear_modules(layer).items():
            full = f"{prefix}.{name}"
            zeros = module.weight.detach() == 0
            keep = stored.get(f"{full}.weight")
            if keep is None and pruned and bool(zeros.any()):
                keep = ~zeros
            grid = grids.get(full)
            kept[full] = Kept(keep=keep, snap=grid.snap if grid is not None else None)
    return CompressedBase(fmt, kept, grids, pruned, stored)


def _lineage_pruned(path: Path) -> bool:
    from orstack.io.manifest import read_manifest

    manifest = read_manifest(path) or {}
    stages = [manifest.get("stage")] + [e.get("stage") for e in manifest.get("lineage", [])]
    return "prune" in stages


def read_grids(path: Path) -> dict[str, Grid]:
    """Each packed Linear's grid, from config.json's quantization_config and the stored
    weight_scale / weight_zero_point tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from orstack.awq.grid import QuantSpec
    from orstack.errors import BadInput
    from orstack.io.safetensors_file import TensorReader

    qc = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    groups = list((qc.get("config_groups") or {}).values())
    reader = TensorReader(path)
    grids: dict[str, Grid] = {}
    for key in reader.keys():
        if not key.endswith(".weight_scale"):
            continue
        module = key[: -len(".weight_scale")]
        scheme = next((g for g in groups if module in (g.get("targets") or [])),
                      groups[0] if len(groups) == 1 else None)
        if scheme is None:
            raise BadInput(f"{path}: packed module {module} matches no config group of its quantization_config")
        args = scheme.get("weights") or {}
        spec = QuantSpec(bits=int(args["num_bits"]), group_size=int(args["group_size"]),
                         symmetric=bool(args.get("symmetric", True)))
        scale = reader.get(key).float()
        zp = None
        if not spec.symmetric:
            zp = unpack_from_int32(reader.get(f"{module}.weight_zero_point"), spec.bits, tuple(scale.shape),
                                   packed_dim=0)
        grids[module] = Grid(spec, scale, zp)
    return grids


def save_compressed(model: nn.Module, tokenizer: Any, out: Path, base: CompressedBase, *, args: Any, parent: str,
                    metrics: dict[str, Any], extra: dict[str, Any]) -> str:
    """Write the folded model in the base's format (sparse bitmask, or packed int-N with the
    base's grids, in the sparse 4-bit layout with the base's masks when it was so stored);
    returns the format's short name ('sparse', 'packed' or 'sparse-packed')."""
    from orstack.io.checkpoint import save_checkpoint

    if base.format == SPARSE:
        from orstack.prune.core import masks_of
        from orstack.prune.storage import save_sparse

        names = set(masks_of(model))

        def write_weights(tmp: Path) -> None:
            metrics.update(save_sparse(model, tmp, names))

        kind = "sparse"
    else:
        from orstack.awq.packed import write_packed

        quantized = {name: grid.codes(model.get_submodule(name).weight.detach()) for name, grid in base.grids.items()}

        if base.format == SPARSE_PACKED:
            def write_weights(tmp: Path) -> None:
                write_packed(model, quantized, tmp, base.stored_masks)

            kind = "sparse-packed"
        else:
            def write_weights(tmp: Path) -> None:
                write_packed(model, quantized, tmp)

            kind = "packed"
    save_checkpoint(model, tokenizer, out, stage="distill", args=args, parent=parent, metrics=metrics,
                    extra={**extra, "weights_format": base.format}, write_weights=write_weights)
    return kind
