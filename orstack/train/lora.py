"""LoRA through peft: wrap, save as an adapter directory (a "modifier"), merge, load back.

An adapter directory holds peft's adapter_config.json + adapter_model.safetensors, the
tokenizer, and orstack.json with `base` (the student it was trained on) and
`weights_format: lora-adapter`, so `load_model(ADAPTER_DIR)` (and `orstack bench`) gives
the base with the adapter applied, and route can hot-swap it on a resident base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orstack.errors import BadInput
from orstack.io.atomic import atomic_path
from orstack.io.checkpoint import quiet_transformers, save_checkpoint
from orstack.io.manifest import build_manifest, read_manifest, write_manifest
from orstack.train.config import TrainConfig

ADAPTER_FORMAT = "lora-adapter"


def decoder_layers(model: Any) -> tuple[str, Any]:
    """(dotted path, ModuleList) of the model's decoder layers, found by structure: the ModuleList
    of `config.num_hidden_layers` (or, failing that, the longest one) whose blocks are of one class."""
    import torch

    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            found.append((name, module))
    if not found:
        raise BadInput(f"model: no decoder layers found in {type(model).__name__} (no list of blocks)")
    exact = [f for f in found if len(f[1]) == n_layers]
    return max(exact or found, key=lambda f: len(f[1]))


def _is_linear(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def layer_linears(model: Any) -> list[str]:
    """The linear modules of a decoder layer, by leaf name in layer order: every nn.Linear (and GPT-2
    Conv1D) inside the blocks -- Phi-3's fused qkv_proj and gate_up_proj included, as one module
    each -- and nothing outside them (never lm_head or the embeddings)."""
    _, layers = decoder_layers(model)
    names: list[str] = []
    for block in layers:
        for name, module in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if name and _is_linear(module) and leaf not in names:
                names.append(leaf)
    return names


def lora_targets(model: Any, config: TrainConfig) -> str | list[str]:
    """What peft's target_modules gets: for 'all-linear' the decoder layers' linears, found by
    structure (leaf names when no module outside the layers shares one, else a regex over the full
    names); an explicit list as given, checked against the model's linears."""
    import re

    requested = config.modules()
    linears = layer_linears(model)
    if requested != "all-linear":
        present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}
        missing = [n for n in requested if n.rsplit(".", 1)[-1] not in present]
        if missing:
            raise BadInput(f"--target-modules: {', '.join(missing)} not found in this {model.config.model_type} "
                           f"model (its decoder linears: {', '.join(linears)})")
        return requested
    prefix, layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    outside = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m) and id(m) not in inside}
    if not outside & set(linears):
        return sorted(linears)
    relative = sorted({name for block in layers for name, m in block.named_modules() if name and _is_linear(m)})
    return rf"{re.escape(prefix)}\.\d+\.(?:{'|'.join(re.escape(r) for r in relative)})"


def lora_config(model: Any, config: TrainConfig) -> Any:
    """peft's LoraConfig for `model`: the structural targets, the rank, and per-module ranks
    (--module-ranks) with alpha scaled to keep the run's alpha/rank ratio."""
    from peft import LoraConfig

    ranks = config.rank_pattern()
    parts = {part for name, m in model.named_modules() if _is_linear(m) for part in name.split(".")}
    unknown = [k.split("=")[0] for k in (config.module_ranks or "").split(",")
               if k.strip() and k.split("=")[0].strip() not in parts]
    if unknown:
        raise BadInput(f"--module-ranks: no linear layer of this {model.config.model_type} model is under a module "
                       f"named {', '.join(u.strip() for u in unknown)}")
    ratio = config.alpha / config.lora_rank
    return LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, target_modules=lora_targets(model, config),
                      rank_pattern=ranks, alpha_pattern={k: r * ratio for k, r in ranks.items()},
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def apply_lora(model: Any, config: TrainConfig) -> Any:
    import warnings

    from peft import get_peft_model

    # peft calls a transformers method that transformers 5 deprecates: not the user's concern.
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
    try:
        return get_peft_model(model, lora_config(model, config))
    except ValueError as e:
        raise BadInput(f"--target-modules {config.target_modules}: {str(e).splitlines()[0][:200]}") from None


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def adapter_base(path: Path) -> str:
    """The base checkpoint of an adapter: the manifest's `base`, else peft's base_model_name_or_path.
    A relative base that does not exist from here is tried relative to the adapter's directory."""
    manifest = read_manifest(path) or {}
    base = manifest.get("base")
    if not base:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise BadInput(f"{path}: adapter names no base model (orstack.json 'base' or adapter_config.json)")
    if not Path(base).exists() and (path.parent / base).exists():
        return str(path.parent / base)
    return str(base)


def load_adapter(path: Path, device: str, dtype: Any, trust_pickle: bool = False) -> Any:
    """The `lora-adapter` format loader: base loaded by load_model, adapter applied and folded in."""
    import warnings

    from peft import PeftModel

    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
    from orstack.io.checkpoint import load_model

    base, _ = load_model(adapter_base(path), device=device, dtype=_dtype_name(dtype),
                         trust_pickle=trust_pickle, with_tokenizer=False)
    model = PeftModel.from_pretrained(base, str(path))
    return model.merge_and_unload().to(device)


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def save_trained(model: Any, tokenizer: Any, out: Path, *, stage: str, config: TrainConfig, base: str,
                 args: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """Save the result of a run; returns what was written: 'adapter', 'merged' or 'full'.
    `extra` adds top-level manifest entries (the quality gate's verdict)."""
    quiet_transformers()
    if config.full:
        save_checkpoint(model, tokenizer, out, stage=stage, args=args, parent=base, metrics=metrics, extra=extra)
        return "full"
    if config.merge:
        merged = model.merge_and_unload()
        save_checkpoint(merged, tokenizer, out, stage=stage, args=args, parent=base, metrics=metrics, extra=extra)
        return "merged"
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, build_manifest(stage, args, parent=base, metrics=metrics,
                                           extra={**(extra or {}), "base": base, "weights_format": ADAPTER_FORMAT}))
    return "adapter"
