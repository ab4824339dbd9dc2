"""Layer-by-layer calibration for compression stages (prune, awq).

The calibration batch goes through the embeddings once; what the first decoder layer
receives (its hidden states) and what the model passes every layer as keyword arguments
(rotary position embeddings, attention mask, position ids ...) are recorded. The keyword
arguments are kept per layer, as the model computed them: Gemma 3 gives sliding and full
layers different rotary tables, every sliding-window family a different mask per layer type,
so the inputs of layer 0 could not be replayed through layer i unchanged. A stage then modifies one layer at a time
and propagates the recorded inputs through the already-modified layer, so memory stays
at about one layer's activations and each layer is calibrated on the inputs it will
really see after the earlier layers were compressed.

    inputs = capture_layer_inputs(model, ids)
    for layer in decoder_layers(model):
        modules = linear_modules(layer)
        with record_input_stats(modules, hessian=True) as stats:
            run_layer(layer, inputs)
        ...  # modify the layer's weights from stats
        inputs = run_layer(layer, inputs)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orstack.architectures import decoder_layers, linear_modules, weightless_model

__all__ = ["InputStats", "LayerInputs", "capture_layer_inputs", "decoder_layers", "linear_modules",
           "record_input_stats", "run_layer", "weightless_model"]

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LayerInputs:
    """What a decoder layer receives, kept per calibration batch.

    `hidden[i]` is [batch, seq, hidden]; `kwargs[i]` the keyword arguments the model passed
    to the first layer for that batch (position_embeddings, attention_mask, position_ids ...),
    `layer_kwargs[id(layer)][i]` those it passed to each layer.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    layer_kwargs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def kwargs_for(self, layer: nn.Module | None) -> list[dict[str, Any]]:
        if layer is None:
            return self.kwargs
        return self.layer_kwargs.get(id(layer), self.kwargs)

    def batches(self, layer: nn.Module | None = None) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """(hidden, keyword arguments of `layer`, or of the first layer) per batch."""
        yield from zip(self.hidden, self.kwargs_for(layer))


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> LayerInputs:
    """Run the embeddings on `input_ids` [n, seq]; record what decoder layer 0 receives and the
    keyword arguments the model passes each layer. The layers themselves do not run: each is
    replaced, for this pass, by a stand-in that records its arguments and returns its input."""
    import torch

    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured = LayerInputs()
    per_layer: list[list[dict[str, Any]]] = [[] for _ in layers]

    def stand_in(index: int):  # noqa: ANN202
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                captured.hidden.append(hidden.detach())
            per_layer[index].append({k: _detach(v) for k, v in kwargs.items() if k != "hidden_states"})
            return hidden

        return forward

    for index, layer in enumerate(layers):
        layer.forward = stand_in(index)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                model.get_decoder()(input_ids=batch, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    captured.kwargs = per_layer[0]
    captured.layer_kwargs = {id(layer): kwargs for layer, kwargs in zip(layers, per_layer)}
    return captured


def _detach(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Propagate recorded inputs through one (possibly modified) decoder layer."""
    import torch

    out = LayerInputs(kwargs=inputs.kwargs, layer_kwargs=inputs.layer_kwargs)
    with torch.no_grad():
        for hidden, kwargs in inputs.batches(layer):
            result = layer(hidden, **kwargs)
            # transformers 5 layers return a tensor, earlier versions a tuple.
            out.hidden.append(result[0] if isinstance(result, tuple) else result)
    return out


class InputStats:
    """Per-input-channel statistics of one Linear's input, accumulated over calibration tokens.

    `sum_sq[j]` = Σ x_j² (Wanda's ‖X_j‖₂ is its square root), `abs_sum[j]` = Σ |x_j| (AWQ's
    mean |x| after dividing by `count`), `xtx` = XᵀX (SparseGPT's Hessian, up to the factor 2/n)
    when asked for, `inputs` the raw inputs [tokens, in_features] when asked for.
    """

    def __init__(self, in_features: int, device: torch.device, hessian: bool, keep_inputs: bool) -> None:
        import torch

        self.count = 0
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self.inputs: list[torch.Tensor] | None = [] if keep_inputs else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.inputs is not None:
            self.inputs.append(x.clone())
        x = x.float()
        self.count += x.shape[0]
        self.sum_sq += (x * x).sum(0)
        self.abs_sum += x.abs().sum(0)
        if self.xtx is not None:
            self.xtx += x.t() @ x

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input channel."""
        return self.sum_sq.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        """XᵀX / n: the (scaled) Hessian of the layer-wise squared error."""
        if self.xtx is None:
            raise ValueError("statistics were recorded without hessian=True")
        return self.xtx / max(self.count, 1)

    def stacked_inputs(self) -> torch.Tensor:
        import torch

        if self.inputs is None:
            raise ValueError("statistics were recorded without keep_inputs=True")
        return torch.cat(self.inputs)


@contextmanager
def record_input_stats(
    modules: dict[str, nn.Linear], *, hessian: bool = False, keep_inputs: bool = False
) -> Iterator[dict[str, InputStats]]:
    """Hook each Linear to accumulate statistics of its input while the block runs."""
    stats = {name: InputStats(m.in_features, m.weight.device, hessian, keep_inputs) for name, m in modules.items()}
    handles = []
    for name, module in modules.items():
        def hook(_module: nn.Module, args: tuple, _output: Any, s: InputStats = stats[name]) -> None:
            s.add(args[0])

        handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
