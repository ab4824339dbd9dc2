"""What a transformers model becomes in llama.cpp: architecture name, metadata, tensor transforms.

The only table here is llama.cpp's: the architecture name it expects for a model type and what
its runtime hard-codes for that architecture (its rotary layout, whether it runs sliding-window
layers, the NoPE step of SmolLM3, the keys its loader requires). Everything else is read from
the model's config and weights:

- q/k rows are permuted iff llama.cpp's graph uses interleaved ("norm") rotary for the arch
  (transformers always rotates halves);
- a norm whose module computes x/rms(x) * (1 + w) (Gemma) is stored as w + 1, found by running
  each norm module on a probe vector, not by family name;
- softcaps, the sliding window and its per-layer pattern (`layer_types`), per-layer-type rope
  bases, Granite's multipliers, key/value length (`head_dim`), partial rotary and Phi-3's original
  context come from the config fields that define them; what llama.cpp cannot represent
  (another `query_pre_attn_scalar`, another NoPE pattern, another activation, rope scaling) is
  refused with one line before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orstack.errors import BadInput


@dataclass(frozen=True)
class LlamaCppArch:
    name: str  # general.architecture
    member: str  # gguf.MODEL_ARCH member (its tensor name map)
    rope: str = "neox"  # "norm": llama.cpp pairs rotary dims (i, i+1): q/k rows are permuted
    activation: tuple[str, ...] = ("silu",)  # the MLP activation llama.cpp's graph applies
    sliding: bool = False  # the runtime runs sliding-window layers (and reads the pattern key)
    swa_rope_base: bool = False  # reads rope.freq_base_swa
    nope_step: int | None = None  # every nope_step-th layer has no rotary (hard-coded, no key)
    required: tuple[str, ...] = ()  # config fields whose keys the loader refuses to do without


GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")
GRANITE_SCALES = ("attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling")
ARCHS = {
    "llama": LlamaCppArch("llama", "LLAMA", rope="norm"),
    "mistral": LlamaCppArch("llama", "LLAMA", rope="norm"),
    "qwen2": LlamaCppArch("qwen2", "QWEN2"),
    "qwen3": LlamaCppArch("qwen3", "QWEN3"),
    "gemma": LlamaCppArch("gemma", "GEMMA", activation=GELU_TANH),
    "gemma2": LlamaCppArch("gemma2", "GEMMA2", activation=GELU_TANH, sliding=True),
    "gemma3_text": LlamaCppArch("gemma3", "GEMMA3", activation=GELU_TANH, sliding=True, swa_rope_base=True),
    "phi3": LlamaCppArch("phi3", "PHI3"),
    "olmo2": LlamaCppArch("olmo2", "OLMO2", sliding=True),
    "olmo3": LlamaCppArch("olmo2", "OLMO2", sliding=True),
    "granite": LlamaCppArch("granite", "GRANITE", rope="norm", required=GRANITE_SCALES),
    "smollm3": LlamaCppArch("smollm3", "SMOLLM3", rope="norm", nope_step=4),
}
SUPPORTED = tuple(ARCHS)


@dataclass
class Layout:
    """How one model is written: the arch, the metadata keys (GGUFWriter method, value) in order,
    and the tensor transforms."""

    model_type: str
    arch: LlamaCppArch
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    rope_dims: int
    rope_base: float
    keys: list[tuple[str, Any]] = field(default_factory=list)  # written after the generic keys
    offset_norms: set[str] = field(default_factory=set)  # HF weight names stored as w + 1

    @property
    def permute(self) -> bool:
        return self.arch.rope == "norm"


def _value(config, *names, default=None):  # noqa: ANN001, ANN202
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope_bases(config, where: str) -> tuple[float, float | None, float]:
    """(base of full-attention layers, base of sliding layers or None, partial rotary factor)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    per_type = {k: v for k, v in params.items() if isinstance(v, dict)}
    groups = per_type or {"full_attention": params}
    for group in groups.values():
        kind = group.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if kind != "default":
            raise BadInput(f"{where}: rope scaling '{kind}' is not supported by orstack gguf yet")
    full = groups.get("full_attention") or next(iter(groups.values()))
    theta = float(full.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    swa = groups.get("sliding_attention")
    factor = float(full.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0)
    return theta, (float(swa["rope_theta"]) if swa and "rope_theta" in swa else None), factor


def layout(config, where: str = "model") -> Layout:  # noqa: ANN001 - a transformers PretrainedConfig
    """The Layout of a model with this config (norm offsets are added by `probe_norms`); refuses,
    from the config alone, a model llama.cpp cannot run faithfully (one line)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise BadInput(f"{where}: unsupported architecture '{model_type}' for GGUF "
                       f"(supported: {', '.join(SUPPORTED)})")
    arch = ARCHS[model_type]
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    n_kv = _value(config, "num_key_value_heads", default=n_heads)
    head_dim = _value(config, "head_dim", default=config.hidden_size // n_heads)
    act = _value(config, "hidden_activation", "hidden_act")
    if act not in arch.activation:
        raise BadInput(f"{where}: activation '{act}' is not what llama.cpp's {arch.name} runs "
                       f"({', '.join(arch.activation)})")
    theta, swa_theta, partial = _rope_bases(config, where)
    out = Layout(model_type, arch, n_layers, n_heads, n_kv, head_dim, int(head_dim * partial), theta)
    keys = out.keys

    if swa_theta is not None and arch.swa_rope_base:
        keys.append(("add_rope_freq_base_swa", swa_theta))
    elif swa_theta not in (None, theta):
        raise BadInput(f"{where}: sliding layers use rope base {swa_theta:g}, full ones {theta:g}; "
                       f"llama.cpp's {arch.name} has one base")

    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim:
        raise BadInput(f"{where}: query_pre_attn_scalar {scalar} != head_dim {head_dim}; llama.cpp scales "
                       "attention by 1/sqrt(head_dim)")
    for attr, method in (("attn_logit_softcapping", "add_attn_logit_softcapping"),
                         ("final_logit_softcapping", "add_final_logit_softcapping")):
        value = getattr(config, attr, None)
        if value:
            keys.append((method, float(value)))

    layer_types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types and not arch.sliding:
        raise BadInput(f"{where}: sliding-window layers, which llama.cpp's {arch.name} does not run")
    if arch.sliding and layer_types and window:
        # always the per-layer pattern: without it the runtime assumes its own (Gemma 2: every 2nd
        # layer full, Gemma 3: every 6th), whatever the checkpoint says
        keys.append(("add_sliding_window", int(window)))
        keys.append(("add_sliding_window_pattern", [t == "sliding_attention" for t in layer_types]))

    # llama.cpp rotates every layer, or (SmolLM3) all but every nope_step-th, whatever the config says
    step = arch.nope_step
    expected = [int(step is None or (i + 1) % step != 0) for i in range(n_layers)]
    nope = list(getattr(config, "no_rope_layers", None) or [1] * n_layers)[:n_layers]
    if nope != expected:
        raise BadInput(f"{where}: rotary on layers {nope} (no_rope_layers); llama.cpp's {arch.name} "
                       + (f"hard-codes every {step}th layer without rotary ({expected})" if step
                          else "rotates every layer"))

    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        keys.append(("add_rope_scaling_orig_ctx_len", int(original)))

    scales = {"attention_multiplier": "add_attention_scale", "embedding_multiplier": "add_embedding_scale",
              "residual_multiplier": "add_residual_scale", "logits_scaling": "add_logit_scale"}
    for attr, method in scales.items():
        value = getattr(config, attr, None)
        if value is not None:
            keys.append((method, float(value)))
        elif attr in arch.required:
            raise BadInput(f"{where}: config has no {attr}, which llama.cpp's {arch.name} requires")
    return out


def probe_norms(model, out: Layout) -> None:
    """Find the norms that scale by (1 + w): run each RMS norm module on a probe vector and see
    which of x/rms(x) * w and x/rms(x) * (1 + w) it computes."""
    import torch

    from orstack.layerwise import held_params

    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not name.endswith("norm") or weight is None or weight.ndim != 1 or getattr(module, "bias", None) is not None:
            continue
        with held_params(model, module):  # a streamed model's norm, read for the probe
            _probe_norm(name, module, generator, out)


def _probe_norm(name: str, module, generator, out: Layout) -> None:  # noqa: ANN001
    import torch

    weight = module.weight
    eps = float(_value(module, "variance_epsilon", "eps", default=1e-6))
    x = torch.randn(2, weight.shape[0], generator=generator)
    with torch.no_grad():
        y = module(x.to(weight.dtype)).float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.detach().float()
    plain = (y - normed * w).abs().max().item()
    offset = (y - normed * (1 + w)).abs().max().item()
    tol = 1e-2 * normed.abs().max().item() * (1 + w.abs().max().item())
    if min(plain, offset) > tol:
        raise BadInput(f"{name}: {type(module).__name__} is neither x/rms(x)*w nor x/rms(x)*(1+w); "
                       "llama.cpp's RMS norm cannot run it")
    if offset < plain:
        out.offset_norms.add(f"{name}.weight")
