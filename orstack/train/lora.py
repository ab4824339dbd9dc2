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


def apply_lora(model: Any, config: TrainConfig) -> Any:
    import warnings

    from peft import LoraConfig, get_peft_model

    # peft calls a transformers method that transformers 5 deprecates: not the user's concern.
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, target_modules=config.modules(),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
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
                 args: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Save the result of a run; returns what was written: 'adapter', 'merged' or 'full'."""
    quiet_transformers()
    if config.full:
        save_checkpoint(model, tokenizer, out, stage=stage, args=args, parent=base, metrics=metrics)
        return "full"
    if config.merge:
        merged = model.merge_and_unload()
        save_checkpoint(merged, tokenizer, out, stage=stage, args=args, parent=base, metrics=metrics)
        return "merged"
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, build_manifest(stage, args, parent=base, metrics=metrics,
                                           extra={"base": base, "weights_format": ADAPTER_FORMAT}))
    return "adapter"
