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

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.architectures import decoder_layers, linear_modules, weightless_model

__all__ = ["InputStats", "LayerInputs", "StreamedModel", "SweepPerplexity", "capture_batches", "capture_layer_inputs",
           "decoder_layers", "head_logits", "held", "layer_major_logits", "linear_modules", "load_streamed",
           "record_input_stats", "run_layer", "stream_of", "weightless_model"]

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
    return capture_batches(model, [{"input_ids": input_ids[start:start + batch_size]}
                                   for start in range(0, input_ids.shape[0], batch_size)])


def capture_batches(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> LayerInputs:
    """`capture_layer_inputs` for batches given as the decoder's keyword arguments (input_ids,
    and attention_mask where rows are padded), one LayerInputs batch each."""
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
    stream = stream_of(model)
    try:
        # a streamed model's layers must not be read for a pass that does not run them
        with torch.no_grad(), held(model, model.get_input_embeddings()), _paused(stream):
            for batch in batches:
                model.get_decoder()(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    captured.kwargs = per_layer[0]
    captured.layer_kwargs = {id(layer): kwargs for layer, kwargs in zip(layers, per_layer)}
    return captured


@contextmanager
def _paused(stream: StreamedModel | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    before, stream.paused = stream.paused, True
    try:
        yield
    finally:
        stream.paused = before


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


def layer_major_logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
    """The logits of `model(**batch)` for every batch, computed a decoder layer at a time: every
    batch goes through layer i before layer i+1 is read, so a streamed model reads each layer
    once per call instead of once per batch. The same arithmetic as the whole-model forward on
    each batch (same layer, same inputs, same keyword arguments), so the same bits. Holds the
    hidden states of all batches at once (tokens x hidden x 4 bytes)."""
    inputs = capture_batches(model, batches)
    for layer in decoder_layers(model):
        with held(model, layer):
            inputs = run_layer(layer, inputs)
    yield from head_logits(model, batches, inputs)


def head_logits(model: nn.Module, batches: list[dict[str, torch.Tensor]], final: LayerInputs,
                ) -> Iterator[torch.Tensor]:
    """Each batch's logits from the last decoder layer's output `final.hidden[i]`, through the
    model's own forward (final norm, lm_head, any soft-capping): its layers are stood in for by
    the final hidden states and the embeddings skipped (zero inputs_embeds of the right shape:
    the rotary tables and masks depend only on shapes, positions and the attention mask)."""
    import torch

    layers = decoder_layers(model)
    head = model.get_output_embeddings()
    with held(model, head), _paused(stream_of(model)):
        for batch, hidden in zip(batches, final.hidden):
            def stand_in(*_args: Any, _hidden: torch.Tensor = hidden, **_kwargs: Any) -> torch.Tensor:
                return _hidden

            for layer in layers:
                layer.forward = stand_in
            try:
                embeds = torch.zeros(*hidden.shape, dtype=hidden.dtype, device=hidden.device)
                rest = {k: v.to(hidden.device) for k, v in batch.items() if k != "input_ids"}
                with torch.no_grad():
                    logits = model(inputs_embeds=embeds, **rest, use_cache=False).logits
            finally:
                for layer in layers:
                    del layer.forward
            yield logits


class SweepPerplexity:
    """Held-out perplexity measured inside a stage's own layer sweep, so a streamed stage reads
    no layer again for it: the held-out windows go through the embeddings once (here), then
    through each decoder layer as the stage has it in memory (`advance`), and finally through
    the head (`ppl`). Two of these advanced before and after a layer is changed give the
    perplexity before and after the stage, in the bits a whole-model forward would give
    (orstack.backends.perplexity's windows, batches and scoring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, texts: list[str], max_length: int,
                 batch_size: int = 8) -> None:
        from orstack.backends.perplexity import pad_id_of, text_windows, window_batches

        self.windows, self.n_bytes = text_windows(tokenizer, texts, max_length)
        self.batches, self.inputs = window_batches(self.windows, batch_size, pad_id_of(tokenizer),
                                                   next(model.parameters()).device)
        self.hidden = capture_batches(model, self.inputs)

    def copy(self) -> SweepPerplexity:
        other = object.__new__(SweepPerplexity)
        other.__dict__.update(self.__dict__)
        return other

    def advance(self, layer: nn.Module) -> None:
        self.hidden = run_layer(layer, self.hidden)

    def ppl(self, model: nn.Module) -> float:
        import math

        from orstack.backends.perplexity import score_logits

        nll = score_logits(self.batches, head_logits(model, self.inputs, self.hidden))
        return math.exp(nll / max(sum(w.n_scored for w in self.windows), 1))


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


# ---------------------------------------------------------------------------- streaming

class StreamedModel:
    """A model whose decoder layers and embedding matrices stay on disk until they are used.

    Built from the config with every parameter an empty tensor (ties kept: a tied lm_head is
    the embedding's own Parameter), it holds in memory only the small tensors outside the
    decoder layers (final norm, rotary tables). A *unit* -- a decoder layer, the input
    embedding, the output projection -- is read from the checkpoint (in its stored dtype,
    then cast to `dtype`, the dtype of the arithmetic) when a forward pass reaches it and
    dropped when the pass leaves it, so a whole-model forward (perplexity, generation) costs
    one unit of weights at a time. A stage that changes a unit holds it (`hold`) while it
    works and writes it out before letting go. The anchor is llm-compressor's sequential
    onloading; this reads with plain file reads (orstack.io.safetensors_file.TensorReader).
    """

    def __init__(self, model: nn.Module, reader: Any, dtype: torch.dtype, device: str = "cpu") -> None:
        import torch

        from orstack.errors import BadInput

        self.model, self.reader, self.dtype, self.device = model, reader, dtype, device
        self.paused = False
        _allocate_large_tensors_by_mmap()
        named = model.state_dict(keep_vars=True)
        shapes = {name: tuple(t.shape) for name, t in named.items()}
        self.shapes = shapes
        by_param: dict[int, list[str]] = {}
        for name, t in named.items():
            by_param.setdefault(id(t), []).append(name)
        fresh: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in fresh:
                    fresh[id(p)] = torch.nn.Parameter(torch.empty(0, dtype=p.dtype, device=device),
                                                      requires_grad=False)
                    by_param[id(fresh[id(p)])] = by_param.pop(id(p))
                module._parameters[key] = fresh[id(p)]
        # checkpoint name -> (Parameter, shape); a tied pair is one entry under the stored name
        self.params: dict[str, tuple[torch.nn.Parameter, tuple[int, ...]]] = {}
        missing = []
        for p in fresh.values():
            names = by_param[id(p)]
            stored = next((n for n in names if n in reader), None)
            if stored is None:
                missing.append(names[0])
                continue
            if tuple(reader.shape(stored)) != shapes[stored]:
                raise BadInput(f"{reader.directory}: {stored} is {list(reader.shape(stored))} in the checkpoint, "
                               f"{list(shapes[stored])} in config.json")
            self.params[stored] = (p, shapes[stored])
        unexpected = sorted(n for n in reader.keys() if n not in self.params and n not in named
                            and not n.endswith("rotary_emb.inv_freq"))
        if missing or unexpected:
            raise BadInput(f"{reader.directory}: weights do not match config.json "
                           f"(missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})")
        self.units: list[nn.Module] = list(decoder_layers(model))
        for head in (model.get_input_embeddings(), model.get_output_embeddings()):
            if head is not None and all(head is not u for u in self.units):
                self.units.append(head)
        self._unit_names = {id(u): self._names_in(u) for u in self.units}
        in_units = {n for names in self._unit_names.values() for n in names}
        self.resident = [n for n in self.params if n not in in_units]
        for name in self.resident:
            self._load(name)
        for name, t in named.items():  # persistent buffers stored with the weights
            if name in reader and not isinstance(t, torch.nn.Parameter):
                t.data = reader.get(name).to(device=device, dtype=t.dtype)
        self._held: dict[int, int] = {}
        self._transient: set[int] = set()
        for unit in self.units:
            unit.register_forward_pre_hook(self._before)
            unit.register_forward_hook(self._after)
        model._orstack_stream = self

    def _names_in(self, unit: nn.Module) -> list[str]:
        ids = {id(p) for p in unit.parameters()}
        return [n for n, (p, _) in self.params.items() if id(p) in ids]

    def names(self, unit: nn.Module) -> list[str]:
        """The checkpoint names of a unit's weights."""
        return self._unit_names[id(unit)]

    def _load(self, name: str) -> None:
        p, _ = self.params[name]
        t = self.reader.get(name)
        p.data = t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)

    def _drop(self, name: str) -> None:
        import torch

        p, _ = self.params[name]
        p.data = torch.empty(0, dtype=p.dtype, device=self.device)

    def is_loaded(self, unit: nn.Module) -> bool:
        return all(self.params[n][0].numel() == int(_numel(self.params[n][1])) for n in self.names(unit))

    def load(self, unit: nn.Module) -> None:
        for name in self.names(unit):
            if self.params[name][0].numel() != _numel(self.params[name][1]):
                self._load(name)

    def release(self, unit: nn.Module) -> None:
        for name in self.names(unit):
            self._drop(name)

    def batch_logits(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """`model(**batch).logits` for every batch, each layer read once for all of them
        (`layer_major_logits`); how lower layers (perplexity) score a streamed model."""
        return layer_major_logits(model, batches)

    @contextmanager
    def hold(self, unit: nn.Module) -> Iterator[nn.Module]:
        """Keep `unit` in memory (as read, then as the caller changes it) until the block ends."""
        key = id(unit)
        self.load(unit)
        self._held[key] = self._held.get(key, 0) + 1
        try:
            yield unit
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
                self.release(unit)

    def _before(self, unit: nn.Module, _args: Any) -> None:
        if self.paused or id(unit) in self._held:
            return
        if not self.is_loaded(unit):
            self.load(unit)
            self._transient.add(id(unit))

    def _after(self, unit: nn.Module, _args: Any, _output: Any) -> None:
        if id(unit) in self._transient and id(unit) not in self._held:
            self._transient.discard(id(unit))
            self.release(unit)

    def tensor(self, name: str) -> torch.Tensor:
        """One weight as stored (a unit's weight is read from disk, not from the model)."""
        return self.reader.get(name)

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name)


def _allocate_large_tensors_by_mmap() -> None:
    """glibc raises its mmap threshold (up to 32 MB) each time a mapped block is freed, so the
    layer-sized tensors a stream allocates and frees over and over soon come from the heap,
    which does not shrink: measured on a 0.1B model, prune's peak went from 586 MB to 1,287 MB.
    A fixed threshold (M_MMAP_THRESHOLD, 128 KB: glibc's initial value) gives each freed
    tensor back at once. Process-wide, and only where glibc is the allocator."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _numel(shape: tuple[int, ...]) -> int:
    import math

    return math.prod(shape)


def stream_of(model: nn.Module) -> StreamedModel | None:
    """The StreamedModel behind `model`, or None for a model held in memory."""
    return getattr(model, "_orstack_stream", None)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextmanager
def resident_while(model: nn.Module, share: float = 0.5) -> Iterator[bool]:
    """For the block, hold every unit of a streamed model in memory when its weights (in the
    arithmetic dtype) fit in `share` of the available memory; yields whether it does. Passes
    that run the whole model many times (greedy generation, one forward per token) then read
    and decode the checkpoint once instead of once per pass. A model already in memory, or
    too large, is left as it is."""
    stream = stream_of(model)
    if stream is None:
        yield True
        return
    need = sum(_numel(shape) for _, shape in stream.params.values()) * stream.dtype.itemsize
    free = available_memory_bytes()
    if free is None or need > share * free:
        yield False
        return
    with ExitStack() as stack:
        for unit in stream.units:
            stack.enter_context(stream.hold(unit))
        yield True


@contextmanager
def held(model: nn.Module, unit: nn.Module) -> Iterator[nn.Module]:
    """`unit` in memory for the block: a no-op for a model held in memory."""
    stream = stream_of(model)
    if stream is None:
        yield unit
    else:
        with stream.hold(unit):
            yield unit


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real (rotary
    tables are computed at construction, not stored): each parameter is moved to meta the
    moment it is registered, so no weight of the model is ever materialised."""
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original


def load_streamed(spec: str | Path, *, device: str = "cpu", dtype: str | None = None, with_tokenizer: bool = True,
                  ) -> tuple[nn.Module, Any]:
    """A causal LM from a local safetensors checkpoint as a StreamedModel (see there), and its
    tokenizer: what `load_model` gives, without reading the weights. `dtype` is the dtype of
    the arithmetic (default float32); each tensor keeps its stored dtype on disk."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from orstack.io.checkpoint import (
        check_causal_lm,
        checkpoint_directory,
        load_config,
        load_tokenizer,
        open_weights,
        quiet_transformers,
        resolve_checkpoint,
        resolve_dtype,
    )

    source = resolve_checkpoint(spec)
    torch_dtype = resolve_dtype(dtype)
    config = load_config(source)
    check_causal_lm(config, str(spec))
    reader = open_weights(source)
    if hasattr(config, "quantization_config"):  # a packed checkpoint: its reader gives plain weights
        del config.quantization_config
    quiet_transformers()
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=False)
    files = checkpoint_directory(source)  # a .orz pack's config files are beside its tensors, not in it
    if (Path(files) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(files))
    StreamedModel(model, reader, torch_dtype, device)
    model.eval()
    return model, load_tokenizer(source) if with_tokenizer else None


class Staging:
    """A scratch directory beside a stage's output where a streamed stage writes its weights
    before its gate decides; `move_weights(tmp)` moves them into the output being committed.
    Removed when the run ends, however it ends (the directory object's finalizer)."""

    def __init__(self, output: str | Path) -> None:
        import tempfile

        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix=f".{output.name}.staging-", dir=output.parent)
        self.path = Path(self._dir.name)
        active = _STAGINGS.get()
        if active is not None:
            active.append(self)

    def move_weights(self, tmp: Path) -> None:
        from orstack.io.safetensors_file import INDEX_SUFFIX

        for f in sorted(self.path.iterdir()):
            if f.name.endswith((".safetensors", INDEX_SUFFIX)):
                f.replace(tmp / f.name)

    def cleanup(self) -> None:
        self._dir.cleanup()


def write_stored(stream: StreamedModel, writer: Any, names: list[str] | None = None) -> int:
    """Copy weights from a streamed model's checkpoint to `writer` as stored, one at a time
    (default: every weight outside the decoder layers not yet in the writer); returns the bytes copied."""
    done = set(writer.weight_map) | set(writer._entries)
    if names is None:
        in_layers = {n for layer in decoder_layers(stream.model) for n in stream.names(layer)}
        names = [n for n in stream.params if n not in in_layers]
    total = 0
    for name in names:
        if name in done or f"{name}.values" in done:
            continue
        t = stream.tensor(name)
        writer.add(name, t)
        total += t.numel() * t.element_size()
    return total


@contextmanager
def held_params(model: nn.Module, module: nn.Module) -> Iterator[nn.Module]:
    """A module's own parameters (not its children's) in memory for the block; a no-op for a
    model in memory or parameters already there."""
    stream = stream_of(model)
    if stream is None:
        yield module
        return
    ids = {id(p) for p in module.parameters(recurse=False)}
    names = [n for n, (p, shape) in stream.params.items() if id(p) in ids and p.numel() != _numel(shape)]
    for name in names:
        stream._load(name)
    try:
        yield module
    finally:
        for name in names:
            stream._drop(name)


def param_shape(model: nn.Module, param: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter has in the checkpoint (a streamed model's may be empty now)."""
    stream = stream_of(model)
    if stream is not None:
        for p, shape in stream.params.values():
            if p is param:
                return shape
    return tuple(param.shape)


_STAGINGS: ContextVar[list[Staging] | None] = ContextVar("orstack_stagings", default=None)


def cleans_staging(run: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a stage's `run`: every Staging made during the call is removed when it returns or
    raises (a failed gate, Ctrl-C), not when the garbage collector gets to it."""
    import functools

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _STAGINGS.set([])
        try:
            return run(*args, **kwargs)
        finally:
            for staging in _STAGINGS.get() or []:
                staging.cleanup()
            _STAGINGS.reset(token)

    return wrapper
