"""Activation importance for `orstack gguf --imatrix`: llama.cpp's importance matrix.

For every Linear weight, the mean squared input activation per input column over the
calibration text (what llama.cpp's `llama-imatrix` stores). The quantizers weight each
element's squared error by it (orstack/gguf/kquants.py, orstack/gguf/legacy.py), so
columns the model leans on are kept more precisely.

Collected layer by layer (orstack/layerwise.py, as prune and awq calibrate), so a streamed
model never holds more than one layer; the output projection's importance comes from the
final normed hidden states (a tied model's token embedding is its output matrix in llama.cpp,
so it takes that importance too).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

SEQLEN = 512  # calibration window (tokens), capped by the model's context
MAX_WINDOWS = 64  # consecutive windows taken from the start of the text, like llama-imatrix's chunks
MIN_TOKENS = 16


@dataclass
class Importance:
    values: dict[str, np.ndarray]  # HF weight name -> mean x_j^2 per input column, float32
    source: str
    sha256: str
    n_tokens: int
    n_windows: int
    seqlen: int
    tied_output: str | None = None  # the embedding weight that is also the output matrix
    notes: list[str] = field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        return {"file": self.source, "sha256": self.sha256, "tokens": self.n_tokens, "windows": self.n_windows,
                "seqlen": self.seqlen, "tensors": len(self.values), "importance_sha256": self.digest()}

    def digest(self) -> str:
        """sha256 of the importance itself (names and float32 values, in name order): what the
        quantizers were given, whatever text or collection produced it."""
        import numpy as np

        digest = hashlib.sha256()
        for name in sorted(self.values):
            digest.update(name.encode() + b"\0")
            digest.update(np.ascontiguousarray(self.values[name], dtype="<f4").tobytes())
        return digest.hexdigest()

    def for_weight(self, hf_name: str) -> np.ndarray | None:
        if hf_name in self.values:
            return self.values[hf_name]
        if self.tied_output is not None and hf_name == self.tied_output:
            return self.values.get("lm_head.weight")
        return None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def calibration_ids(tokenizer: Any, path: str | Path, context: int | None) -> Any:
    """Consecutive windows [n, seqlen] of the calibration file's tokens (.txt or .jsonl)."""
    import torch

    from orstack.io.text import concatenated_ids, read_texts

    ids = concatenated_ids(tokenizer, read_texts(path))
    seqlen = min(SEQLEN, context or SEQLEN, len(ids))
    if seqlen < MIN_TOKENS:
        raise BadInput(f"--imatrix {path}: only {len(ids)} tokens of text; at least {MIN_TOKENS} are needed")
    n = min(MAX_WINDOWS, len(ids) // seqlen)
    return torch.tensor([ids[i * seqlen:(i + 1) * seqlen] for i in range(n)], dtype=torch.long)


def collect_importance(model: Any, tokenizer: Any, path: str | Path, batch_size: int = 4) -> Importance:
    """Mean squared input per column of every Linear in the decoder layers and of the output."""
    import torch

    from orstack.architectures import layer_prefix
    from orstack.layerwise import (
        capture_layer_inputs,
        decoder_layers,
        held,
        linear_modules,
        record_input_stats,
        run_layer,
    )

    ids = calibration_ids(tokenizer, path, getattr(model.config, "max_position_embeddings", None))
    inputs = capture_layer_inputs(model, ids, batch_size)
    values: dict[str, np.ndarray] = {}
    for i, layer in enumerate(decoder_layers(model)):
        with held(model, layer):
            prefix = layer_prefix(model, i)
            with record_input_stats(linear_modules(layer)) as stats:
                inputs = run_layer(layer, inputs)
            for name, s in stats.items():
                values[f"{prefix}.{name}.weight"] = (s.sum_sq / max(s.count, 1)).cpu().numpy()
    notes = []
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is not None:
        with torch.no_grad():  # the final norm stays in memory even for a streamed model
            total, count = None, 0
            for hidden in inputs.hidden:
                h = norm(hidden).float().reshape(-1, hidden.shape[-1])
                total = (h * h).sum(0) if total is None else total + (h * h).sum(0)
                count += h.shape[0]
        values["lm_head.weight"] = (total / max(count, 1)).cpu().numpy()
    else:
        notes.append("no final norm found: the output matrix is quantized without importance")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embeddings = model.get_input_embeddings()
    embed = next((f"{n}.weight" for n, m in model.named_modules() if m is embeddings), None)
    return Importance(values, str(path), file_sha256(path), int(ids.numel()), int(ids.shape[0]), int(ids.shape[1]),
                      tied_output=embed if tied else None, notes=notes)
