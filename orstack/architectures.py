"""Structural knowledge about decoder models: the one place that knows what a decoder is made of.

Nothing here is a table of model types. A checkpoint is supported when its model, built on the
meta device from the config alone (no weights), has what the compression stages need:

- a stack of decoder layers (the ModuleList of `config.num_hidden_layers` identical blocks
  inside the base model), each made of `nn.Linear`s;
- no mixture-of-experts layer (routed experts stored as 3-D parameters, which no Linear-wise
  algorithm can handle).

Within a layer, what matters is found by running it, not by name:

- which Linears read the very same input tensor (q/k/v, or Phi-3's fused qkv_proj alone;
  gate/up, or the fused gate_up_proj alone; o; down), see `shared_input_groups`;
- which op produces that input channel by channel, so that a per-input-channel scale can be
  folded into it without changing the function (`find_fold`): a norm weight (llama style
  `w·n(x)`, or Gemma's `(1 + w)·n(x)`, told apart by `norm_kind`), a Linear's output rows, or a
  contiguous tail slice of a fused Linear's rows (the v rows of Phi-3's qkv_proj feed o_proj;
  the up half of gate_up_proj feeds down_proj). OLMo 2's q/k/v and gate/up read the residual
  stream itself: nothing produces it channel by channel, so no fold exists (`find_fold` is None).

The probe: multiply the candidate's output channels by distinct known factors r_k (for a
`(1+w)` norm: its gain, i.e. `w ← (1+w)·r − 1`) and run the layer again. If every channel c of
the group's input comes back multiplied by exactly one r_k, channel c is a per-channel linear
function of the candidate's channel k, and dividing channel k by s_k while multiplying the
group's input column c by s_k leaves the layer unchanged. A LayerNorm's bias is scaled with its
weight (y = n(x)·w + b is linear in (w, b) jointly). q/k rows behind a softmax or q/k norms, a
gate behind an activation, a post-norm behind a residual add all fail the test and are never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput

if TYPE_CHECKING:
    import torch
    from torch import nn

# Families the test suite runs every compression stage on (tests/test_families_compress.py); the
# check itself is structural, so others with the same make-up work too.
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi",
                   "olmo", "olmo2", "olmo3", "granite", "smollm3", "starcoder2", "cohere", "stablelm")

# The group's input must equal r_k · x to this relative precision (float32 round-off is ~1e-7).
MATCH_RESIDUAL = 1e-6


def supported_line() -> str:
    return ("supported: decoder models whose layers are built from nn.Linear, without mixture-of-experts "
            f"(tested: {', '.join(TESTED_FAMILIES)})")


# ---------------------------------------------------------------------------------------------
# The decoder stack


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if base is not None else model


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The ModuleList of `config.num_hidden_layers` blocks of one class inside the base model."""
    from torch import nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _name, module in _base_model(model).named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            if len({type(m) for m in module}) == 1:
                return module
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the compression stages cannot work on this model (None: they can)."""
    from torch import nn

    layers = find_decoder_layers(model)
    if layers is None:
        return "no stack of decoder layers found"
    layer = layers[0]
    if any(p.ndim >= 3 for p in layer.parameters()):
        return "mixture-of-experts layers (routed experts are 3-D parameters, not Linears)"
    if any("expert" in name.split(".")[-1] or name.endswith("router") for name, _ in layer.named_modules()):
        return "mixture-of-experts layers"
    if not any(isinstance(m, nn.Linear) for m in layer.modules()):
        kinds = sorted({type(m).__name__ for m in layer.modules() if len(list(m.children())) == 0
                        and getattr(m, "weight", None) is not None and m.weight.ndim == 2})
        return f"its layers hold no nn.Linear ({', '.join(kinds) or 'no matrices'})"
    return None


def check_model(model: nn.Module, where: str = "") -> None:
    reason = unsupported_reason(model)
    if reason is not None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise BadInput(f"{where or 'model'}: unsupported architecture '{model_type}': {reason}; {supported_line()}")


def weightless_model(config: Any) -> nn.Module:
    """The model a config describes, on the meta device (shapes only, no memory): for checks
    that need the layers before any weight is loaded."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # a packed checkpoint: the plain model's shapes
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def check_config(config: Any, where: str = "") -> None:
    """The structural check on a config alone (a meta-device model; no weight is read): a causal
    LM first (an encoder is refused by name), then decoder layers orstack can work on."""
    from orstack.io.checkpoint import check_causal_lm

    model_type = getattr(config, "model_type", None)
    check_causal_lm(config, where or "model")
    try:
        model = weightless_model(config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
        raise BadInput(f"{where or 'model'}: unsupported architecture '{model_type}' "
                       f"(transformers cannot build it: {str(e).strip().splitlines()[0][:200] if str(e) else ''}); "
                       f"{supported_line()}") from None
    check_model(model, where)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM; bad input naming what is supported otherwise."""
    check_model(model)
    return find_decoder_layers(model)


def layer_prefix(model: nn.Module, index: int) -> str:
    """The full module name of decoder layer `index` ('model.layers.3')."""
    layer = decoder_layers(model)[index]
    return next(name for name, m in model.named_modules() if m is layer)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm between the last decoder layer and lm_head (None if the model has none)."""
    base = _base_model(model)
    for name in ("norm", "final_layernorm", "final_norm", "ln_f"):
        module = getattr(base, name, None)
        if module is not None:
            return module
    return None


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """name -> Linear inside a layer, e.g. 'self_attn.q_proj', 'mlp.down_proj' (fused modules,
    Phi-3's 'self_attn.qkv_proj' and 'mlp.gate_up_proj', are single Linears)."""
    from torch import nn

    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def linear_role(name: str) -> str | None:
    """'attention' or 'mlp' for a Linear's name inside a layer, from the submodule holding it."""
    head = name.split(".")[0].lower()
    if "attn" in head or "attention" in head:
        return "attention"
    if "mlp" in head or "ffn" in head or "feed_forward" in head:
        return "mlp"
    return None


# ---------------------------------------------------------------------------------------------
# Norms


def norm_kind(module: nn.Module) -> str | None:
    """How a module with a 1-D `weight` uses it, measured on a random input:
    'scale' (y = w·n(x) [+ b]), 'offset' (y = (1 + w)·n(x): Gemma) or None (neither)."""
    import torch

    weight = module._parameters.get("weight")
    if weight is None or weight.ndim != 1 or weight.device.type == "meta":
        return None
    n = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=gen, dtype=torch.float32).to(weight.device, weight.dtype)
    saved = {p: t.data.clone() for p, t in module._parameters.items() if t is not None}
    try:
        with torch.no_grad():
            if "bias" in saved:
                module.bias.data.zero_()
            weight.data.zero_()
            y0 = module(x).float()
            weight.data.fill_(1.0)
            y1 = module(x).float()
    except Exception:  # noqa: BLE001 - not callable on a bare [tokens, n] input: not a norm
        return None
    finally:
        for p, value in saved.items():
            module._parameters[p].data.copy_(value)
    scale = max(float(y1.abs().max()), 1e-30)
    if float(y0.abs().max()) <= 1e-6 * scale:
        return "scale"
    if float((y1 - 2 * y0).abs().max()) <= 1e-5 * scale:
        return "offset"
    return None


def norm_gain(module: nn.Module, kind: str) -> torch.Tensor:
    """The per-channel gain a norm applies (w, or 1 + w), in float32 (float64 for a float64 model)."""
    import torch

    w = module.weight.data.to(torch.promote_types(module.weight.dtype, torch.float32))
    return w + 1.0 if kind == "offset" else w


def set_norm_gain(module: nn.Module, kind: str, gain: torch.Tensor) -> None:
    """Store `gain` as the norm's weight (Gemma's (1 + w): w = gain − 1, computed in float32)."""
    value = gain - 1.0 if kind == "offset" else gain
    module.weight.data.copy_(value.to(module.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Linears sharing an input, and what their input scale folds into


@dataclass
class Fold:
    """Where a group's input scale goes: channel k of `module` (its norm gain and bias, or its
    output rows `start + k` with their bias) is divided by s_k; input channel c of the group is
    produced by channel `source[c]`."""

    module: str
    kind: str  # "norm" (1-D weight, `norm` says how it is applied) or "rows" (a Linear's output rows)
    source: torch.Tensor  # LongTensor [in_features]
    n_source: int
    norm: str | None = None  # "scale" or "offset" for kind "norm"
    start: int = 0  # for "rows": the first row of the slice (a fused Linear's tail part)

    @property
    def label(self) -> str:
        if self.kind == "rows" and self.start:
            return f"{self.module}[{self.start}:{self.start + self.n_source}]"
        return self.module


@dataclass
class LinearGroup:
    names: list[str]  # Linears inside the layer that receive the same input, in call order
    fold: Fold | None


def shared_input_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[list[str]]:
    """Linears that receive the identical input tensor, in the order they are first called."""
    import torch

    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        for tensor, names in seen:
            if tensor is args[0]:
                names.append(name)
                return
        seen.append((args[0], [name]))

    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: hook(mod, args, n))
               for name, m in linear_modules(layer).items()]
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [names for _, names in seen]


def _group_input(layer: nn.Module, first: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    import torch

    captured: list[torch.Tensor] = []
    handle = layer.get_submodule(first).register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            layer(hidden, **kwargs)
    finally:
        handle.remove()
    return captured[0]


def _probe_factors(n: int) -> torch.Tensor:
    """n distinct factors, all > 1 (an op that does not feed the group leaves its input at 1x)."""
    import torch

    return torch.exp(torch.linspace(0.1, 0.7, n, dtype=torch.float64))


def _channel_map(x: torch.Tensor, x_probe: torch.Tensor, factors: torch.Tensor) -> torch.Tensor | None:
    """source[c] if x_probe[:, c] == factors[source[c]] · x[:, c] for every channel c, else None."""
    import torch

    energy = (x * x).sum(0)
    if bool((energy == 0).any()):
        return None  # a silent channel cannot be traced
    ratio = (x_probe * x).sum(0) / energy
    residual = ((x_probe - x * ratio) ** 2).sum(0) / (x_probe * x_probe).sum(0).clamp_min(1e-300)
    if bool((residual > MATCH_RESIDUAL).any()):
        return None
    idx = torch.searchsorted(factors, ratio).clamp(1, len(factors) - 1)
    nearer_lower = (ratio - factors[idx - 1]).abs() < (factors[idx] - ratio).abs()
    source = torch.where(nearer_lower, idx - 1, idx)
    spacing = (factors[1:] - factors[:-1]).min() if len(factors) > 1 else torch.tensor(1.0, dtype=factors.dtype)
    if bool(((factors[source] - ratio).abs() > spacing / 4).any()):
        return None
    return source


def _fold_candidates(layer: nn.Module, group: list[str], width: int) -> list[tuple[str, str, int, int]]:
    """(module, kind, first row, rows) to try, in order: norm weights, whole Linears, then tail
    slices of Linears (a fused module's last part: width/g rows for g = 1..8, the GQA ratios)."""
    from torch import nn

    norms, rows, tails = [], [], []
    for name, module in layer.named_modules():
        weight = module._parameters.get("weight") if name not in group else None
        if weight is None:
            continue
        n = weight.shape[0]
        if weight.ndim == 1:
            norms.append((name, "norm", 0, n))
        elif isinstance(module, nn.Linear):
            rows.append((name, "rows", 0, n))
            for g in range(1, 9):
                part = width // g
                if width % g == 0 and part < n and (name, "rows", n - part, part) not in tails:
                    tails.append((name, "rows", n - part, part))
    return norms + rows + tails


def _scale_channels(module: nn.Module, kind: str, start: int, factors: torch.Tensor, norm: str | None) -> None:
    """Multiply the candidate's channels [start, start + len(factors)) by `factors`."""
    stop = start + factors.shape[0]
    if kind == "norm" and norm == "offset":
        gain = norm_gain(module, norm)
        set_norm_gain(module, norm, gain * factors.to(gain.dtype))
    else:
        w = module.weight.data
        shape = (-1,) + (1,) * (w.ndim - 1)
        w[start:stop].mul_(factors.to(w.dtype).view(shape))
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data[start:stop].mul_(factors.to(bias.dtype))


def find_fold(layer: nn.Module, group: list[str], hidden: torch.Tensor, kwargs: dict[str, Any]) -> Fold | None:
    """The op whose output channels scale the group's input channel by channel (see module doc)."""
    x = _group_input(layer, group[0], hidden, kwargs)
    for name, kind, start, n in _fold_candidates(layer, group, x.shape[1]):
        module = layer.get_submodule(name)
        norm = None
        if kind == "norm":
            norm = norm_kind(module)
            if norm is None:
                continue
        r = _probe_factors(n).to(x.device)
        saved = {p: t.data.clone() for p, t in module._parameters.items() if t is not None}
        try:
            _scale_channels(module, kind, start, r, norm)
            x_probe = _group_input(layer, group[0], hidden, kwargs)
        finally:
            for p, value in saved.items():
                module._parameters[p].data.copy_(value)
        source = _channel_map(x, x_probe, r)
        if source is not None:
            return Fold(module=name, kind=kind, source=source, n_source=n, norm=norm, start=start)
    return None


def discover(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> list[LinearGroup]:
    """The layer's Linear groups with their fold targets, from a short probe input."""
    return [LinearGroup(names, find_fold(layer, names, hidden, kwargs))
            for names in shared_input_groups(layer, hidden, kwargs)]


def fold_into_producer(layer: nn.Module, fold: Fold, s: torch.Tensor) -> None:
    """Divide the producer's channels by s (a norm's gain and bias; a Linear's rows and bias)."""
    producer = layer.get_submodule(fold.module)
    if fold.kind == "norm":
        if fold.norm == "offset":  # Gemma: 1 + w' = (1 + w) / s
            gain = norm_gain(producer, "offset")
            set_norm_gain(producer, "offset", gain / s.to(gain.dtype))
        else:
            producer.weight.data.div_(s.to(producer.weight.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.data.div_(s.to(producer.bias.dtype))
        return
    stop = fold.start + fold.n_source
    producer.weight.data[fold.start:stop].div_(s.to(producer.weight.dtype).unsqueeze(1))
    if producer.bias is not None:
        producer.bias.data[fold.start:stop].div_(s.to(producer.bias.dtype))
