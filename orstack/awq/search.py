"""Activation-aware weight quantization (AWQ, Lin et al. 2023), layer by layer on CPU.

For each decoder layer, with the calibration inputs it really receives (propagated through
the already-quantized layers):
1. find the Linear groups sharing an input and the op each group's input scale folds into
   (orstack.architectures: by probing the layer, not from a per-architecture table): a norm
   (Gemma's (1 + w) norms take w' = (1 + w)/s - 1), a Linear's rows, or the tail slice of a
   fused Linear (the v rows of Phi-3's qkv_proj for o_proj, the up half of gate_up_proj for
   down_proj);
2. per group, search s = mean|x|^α, and (duo scaling, as AutoAWQ) s = mean|x|^α / mean|ŵ|^(1-α)
   with ŵ = |w| / max|w| of its quantization group, over α in {0, 1/n, ..., 1}, minimising the
   group's summed output error tr(Δ G Δᵀ) with Δ = Q(W·diag(s))·diag(s)⁻¹ - W and G = XᵀX/n
   (α = 0 of the first family is RTN);
3. fold the scales: the producing op's channel k is divided by s_k, the group's columns
   multiplied by s (the layer computes the same function before quantization);
4. per Linear, search a clipping ratio per (row, group) on the same error, then quantize; or,
   with `method` "awq+gptq", quantize by GPTQ on the scaled input's Hessian (orstack/awq/gptq.py:
   each column's rounding error compensated in the columns after it). `method` "gptq" skips the
   scale search (steps 2-3).
A group whose input has no fold target (OLMo 2's q/k/v and gate/up read the residual stream
itself) keeps scale 1 -- any other scale would change the function -- and only gets the
clipping search; the run says so once and the manifest lists those groups
(`metrics.unscaled_groups`). Embeddings and lm_head are not quantized.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orstack.awq.clip import output_error, search_clip
from orstack.awq.grid import BITS, Quantized, QuantSpec, fake_quantize, largest_divisor, quantize
from orstack.errors import BadInput

if TYPE_CHECKING:
    import torch
    from torch import nn

    from orstack.architectures import LinearGroup


@dataclass
class AWQConfig:
    """Everything that determines an `orstack awq` result (written into the manifest)."""

    bits: int = 4
    group_size: int | str = 128  # an int, or "auto": the largest divisor of each width <= 128
    symmetric: bool = False
    rtn: bool = False  # plain round-to-nearest, no calibration
    mixed_precision: bool = False
    fake_quant: bool = False
    method: str = "awq"  # METHODS: the scale search, GPTQ's error compensation, or both
    nsamples: int = 32
    seqlen: int | None = None  # None: min(512, the model's context)
    alpha_steps: int = 20  # α in {0, 1/20, ..., 1}
    duo_scaling: bool = True  # also search s = mean|x|^α / mean|ŵ|^(1-α) (AutoAWQ's duo_scaling)
    search_rows: int = 256  # output rows per Linear used in the α search (evenly spaced)
    clip_steps: int = 20
    max_shrink: float = 0.5
    promote_fraction: float = 0.1  # --mixed-precision: share of parameters given bits + 1
    damp: float = 0.01  # GPTQ: λ = damp · mean diag(H) added to H's diagonal
    gptq_blocksize: int = 128  # GPTQ: columns per lazy batch
    act_order: bool = False  # GPTQ: columns in decreasing H_jj, static groups
    batch_size: int = 8
    seed: int = 0
    eval_length: int = 512  # held-out perplexity window, tokens
    calib: list[str] = field(default_factory=list)
    heldout: list[str] | None = None
    # the quality gate (orstack/gates.py): measured on --heldout and --eval against the parent
    eval_tasks: str | None = None  # --eval: Task JSONL: accuracy before and after
    min_retention: float = 0.97
    max_ppl_rise: float | None = None  # None: the retention read on perplexity
    force: bool = False


METHODS = ("awq", "gptq", "awq+gptq")
DEFAULT_SEQLEN = 512

# on_layer(layer index, layer, codes by the Linear's name in the layer): a streamed stage writes the layer out
OnLayer = Callable[[int, "nn.Module", dict[str, Quantized]], None]

UNSCALED_REASON = ("no op with a per-channel weight produces the input (it is the residual stream, a weightless "
                   "norm's or an activation's output), so any scale would change the function: scale 1, "
                   "clipping search only")


@dataclass
class LayerReport:
    layer: int
    alphas: dict[str, float]  # group label (its first Linear) -> chosen α (None: no fold target)
    folds: dict[str, str | None]
    error_rtn: float
    error_awq: float
    groups: dict[str, list[str]] = field(default_factory=dict)  # group label -> its Linears
    scalings: dict[str, str] = field(default_factory=dict)  # group label -> "x" or "duo" (its α's family)

    @property
    def reduction(self) -> float:
        return 1.0 - self.error_awq / self.error_rtn if self.error_rtn > 0 else 0.0


@dataclass
class Quantization:
    """What quantizing a model produced: the codes of every target Linear and the per-layer report."""

    quantized: dict[str, Quantized]  # full module name -> codes, scales, zero points
    layers: list[LayerReport]
    group_sizes: dict[str, int]
    bits: dict[str, int]
    seconds: float = 0.0

    @property
    def error_rtn(self) -> float:
        return sum(r.error_rtn for r in self.layers)

    @property
    def error_awq(self) -> float:
        return sum(r.error_awq for r in self.layers)

    def average_bits(self) -> float:
        n = {name: q.codes.numel() for name, q in self.quantized.items()}
        return sum(self.bits[k] * n[k] for k in n) / max(sum(n.values()), 1)

    def unscaled_groups(self) -> list[str]:
        """The groups (by their Linears' names) that had no op to fold a scale into, in any layer."""
        seen: dict[str, None] = {}
        for report in self.layers:
            for label, members in report.groups.items():
                if report.folds.get(label) is None:
                    seen[",".join(members)] = None
        return list(seen)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "average_bits": round(self.average_bits(), 4),
            "group_sizes": sorted(set(self.group_sizes.values())),
            "seconds": round(self.seconds, 1),
        }
        if self.layers:
            out["output_error_rtn"] = self.error_rtn
            out["output_error"] = self.error_awq
            out["error_reduction_vs_rtn"] = round(1 - self.error_awq / self.error_rtn, 4) if self.error_rtn else 0.0
            out["layers"] = [{"layer": r.layer, "alpha": r.alphas, "scaling": r.scalings, "fold": r.folds,
                              "error_reduction_vs_rtn": round(r.reduction, 4)} for r in self.layers]
            unscaled = self.unscaled_groups()
            if unscaled:
                out["unscaled_groups"] = {"groups": unscaled, "reason": UNSCALED_REASON}
        return out


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' Linears, by full name (embeddings and lm_head are kept)."""
    from orstack.layerwise import decoder_layers, linear_modules

    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        prefix = _layer_prefix(model, i)
        out.update({f"{prefix}.{name}": m for name, m in linear_modules(layer).items()})
    return out


def _layer_prefix(model: nn.Module, i: int) -> str:
    from orstack.architectures import layer_prefix

    return layer_prefix(model, i)


def check_config(cfg: AWQConfig) -> None:
    """Option checks that need no model (run before anything heavy loads)."""
    if cfg.bits not in BITS:
        raise BadInput(f"--bits {cfg.bits}: supported widths are {', '.join(map(str, BITS))}")
    if cfg.group_size != "auto" and (not isinstance(cfg.group_size, int) or cfg.group_size < 1):
        raise BadInput(f"--group-size {cfg.group_size}: expected a positive integer or 'auto'")
    if cfg.method not in METHODS:
        raise BadInput(f"--method {cfg.method}: expected one of {', '.join(METHODS)}")
    if cfg.damp < 0:
        raise BadInput(f"--damp {cfg.damp}: expected a non-negative number")
    if cfg.mixed_precision and cfg.rtn:
        raise BadInput("--mixed-precision needs calibration data and cannot be combined with --rtn")
    if not cfg.rtn and not cfg.calib:
        raise BadInput("--calib: calibration text is required (or use --rtn)")
    from orstack.gates import check_limits

    check_limits(min_retention=cfg.min_retention, max_ppl_rise=cfg.max_ppl_rise)


def group_sizes(model: nn.Module, cfg: AWQConfig) -> dict[str, int]:
    """The group size of every target Linear; a requested size that does not divide a width is
    bad input naming the layers (unless 'auto', which takes the largest divisor <= 128)."""
    linears = target_linears(model)
    if cfg.group_size == "auto":
        return {name: largest_divisor(m.in_features, 128) for name, m in linears.items()}
    bad = sorted({name.rsplit(".", 1)[-1] + f" (width {m.in_features})"
                  for name, m in linears.items() if m.in_features % cfg.group_size})
    if bad:
        raise BadInput(f"--group-size {cfg.group_size} does not divide the input width of {', '.join(bad)}; "
                       "pick a divisor or use --group-size auto")
    return {name: cfg.group_size for name in linears}


def quantize_rtn(model: nn.Module, cfg: AWQConfig, sizes: dict[str, int], on_layer: OnLayer | None = None,
                 ) -> Quantization:
    """Round-to-nearest every target Linear in place (the baseline; no calibration)."""
    import torch

    from orstack.layerwise import decoder_layers, held, linear_modules

    start = time.perf_counter()
    quantized = {}
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            with held(model, layer):
                prefix = _layer_prefix(model, i)
                layer_q = {}
                for local, module in linear_modules(layer).items():
                    name = f"{prefix}.{local}"
                    q = quantize(module.weight.data.float(), QuantSpec(cfg.bits, sizes[name], cfg.symmetric))
                    module.weight.data.copy_(q.dequantize(module.weight.dtype))
                    layer_q[local] = quantized[name] = q
                if on_layer is not None:
                    on_layer(i, layer, layer_q)
    return Quantization(quantized, [], sizes, {n: cfg.bits for n in quantized}, time.perf_counter() - start)


def quantize_awq(model: nn.Module, input_ids: torch.Tensor, cfg: AWQConfig, sizes: dict[str, int],
                 bits: dict[str, int] | None = None, progress: Any = None, on_layer: OnLayer | None = None,
                 ) -> Quantization:
    """AWQ every decoder layer of `model` in place on calibration windows `input_ids` [n, seq].

    `bits` gives a width per Linear (mixed precision); by default every Linear gets cfg.bits.
    `progress(i, n)` is called after each layer. A streamed model has each layer read when its
    turn comes and dropped after `on_layer(i, layer, codes by local name)` wrote it out.
    """
    import torch

    from orstack.architectures import discover
    from orstack.layerwise import (
        capture_layer_inputs,
        decoder_layers,
        held,
        linear_modules,
        record_input_stats,
        run_layer,
    )

    start = time.perf_counter()
    layers = decoder_layers(model)
    bits = bits or {name: cfg.bits for name in sizes}
    inputs = capture_layer_inputs(model, input_ids, cfg.batch_size)
    # A short probe sequence that travels alongside, for discovering each layer's structure.
    probe = capture_layer_inputs(model, input_ids[:1, : min(32, input_ids.shape[1])], 1)
    quantized: dict[str, Quantized] = {}
    reports = []
    for i, layer in enumerate(layers):
        with held(model, layer):
            prefix = _layer_prefix(model, i)
            modules = linear_modules(layer)
            hidden, kwargs = next(probe.batches(layer))
            groups = discover(layer, hidden, kwargs)
            with record_input_stats(modules, hessian=True) as stats:
                run_layer(layer, inputs)
            specs = {name: QuantSpec(bits[f"{prefix}.{name}"], sizes[f"{prefix}.{name}"], cfg.symmetric)
                     for name in modules}
            with torch.no_grad():
                report, layer_q = _quantize_layer(layer, groups, stats, specs, cfg)
            del stats
            report.layer = i
            reports.append(report)
            quantized.update({f"{prefix}.{name}": q for name, q in layer_q.items()})
            inputs = run_layer(layer, inputs)
            probe = run_layer(layer, probe)
            if on_layer is not None:
                on_layer(i, layer, layer_q)
        if progress is not None:
            progress(i + 1, len(layers))
    return Quantization(quantized, reports, sizes, bits, time.perf_counter() - start)


def _quantize_layer(layer: nn.Module, groups: list[LinearGroup], stats: dict, specs: dict[str, QuantSpec],
                    cfg: AWQConfig) -> tuple[LayerReport, dict[str, Quantized]]:
    import torch

    weights = {name: layer.get_submodule(name).weight.data.float().clone() for name in specs}
    grams = {name: stats[name].hessian().float() for name in specs}
    rtn_error = sum(output_error(fake_quantize(weights[n], specs[n]) - weights[n], grams[n]) for n in specs)
    device = next(iter(weights.values())).device
    col_scale = {name: torch.ones(weights[name].shape[1], device=device) for name in specs}
    row_scale = {name: torch.ones(weights[name].shape[0], device=device) for name in specs}
    alphas: dict[str, float | None] = {}
    scalings: dict[str, str] = {}
    folds: dict[str, str | None] = {}
    members = {group.names[0]: list(group.names) for group in groups}
    scale_search = cfg.method in ("awq", "awq+gptq")
    # Scales are all searched on the unmodified layer, then folded together.
    plans = []
    for group in groups:
        label = group.names[0]
        folds[label] = group.fold.label if group.fold else None
        if group.fold is None or not scale_search:
            alphas[label] = None
            continue
        found = search_scale(group, stats, weights, grams, specs, cfg.alpha_steps, cfg.search_rows,
                             cfg.duo_scaling)
        alphas[label], scalings[label] = found.alpha, found.family
        plans.append((group, found.scales))
    for group, s_source in plans:
        _apply_fold(layer, group, s_source, col_scale, row_scale)
    quantized = {}
    awq_error = 0.0
    for name, spec in specs.items():
        module = layer.get_submodule(name)
        w = module.weight.data.float().clone()
        c = col_scale[name]
        gram = grams[name] / torch.outer(c, c)  # the second moment of the scaled input x / s
        if cfg.method in ("gptq", "awq+gptq"):
            from orstack.awq.gptq import gptq_quantize

            q = gptq_quantize(w, gram, spec, damp=cfg.damp, blocksize=cfg.gptq_blocksize,
                              act_order=cfg.act_order, clip_steps=cfg.clip_steps, max_shrink=cfg.max_shrink)
        else:
            q = quantize(w, spec, search_clip(w, gram, spec, cfg.clip_steps, cfg.max_shrink))
        w_hat = q.dequantize(torch.float32)
        module.weight.data.copy_(w_hat.to(module.weight.dtype))
        quantized[name] = q
        # Error in the original coordinates: undo the row fold and the column scale.
        delta = row_scale[name].unsqueeze(1) * (w_hat - w) / c
        awq_error += output_error(delta, grams[name])
    return LayerReport(-1, alphas, folds, rtn_error, awq_error, members, scalings), quantized


def _source_mean(group: LinearGroup, per_channel: torch.Tensor) -> torch.Tensor:
    """A per-input-channel statistic averaged over the input channels each fold-source channel feeds."""
    import torch

    fold = group.fold
    x = per_channel.double()
    source = fold.source.to(x.device)
    total = torch.zeros(fold.n_source, dtype=torch.float64, device=x.device).index_add_(0, source, x)
    count = torch.zeros(fold.n_source, dtype=torch.float64, device=x.device).index_add_(0, source, torch.ones_like(x))
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total))


def _source_mean_abs(group: LinearGroup, stats: dict) -> torch.Tensor:
    """mean|x| per fold-source channel."""
    return _source_mean(group, stats[group.names[0]].mean_abs)


def _weight_mean(group: LinearGroup, weights: dict, specs: dict) -> torch.Tensor:
    """mean over the group's rows of |w| / max|w| of its quantization group, per source channel
    (AutoAWQ's w_mean: how large a channel's weights are on the grid they share)."""
    import torch

    parts = []
    for n in group.names:
        w = weights[n].abs()
        g = w.reshape(w.shape[0], -1, specs[n].group_size)
        parts.append((g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape))
    return _source_mean(group, torch.cat(parts).mean(0))


def scales_for(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = mean|x|^α (or, duo, mean|x|^α / mean|ŵ|^(1-α)), normalised so that max·min = 1 (as
    AWQ does; keeps s around 1)."""
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp_min(1e-4)
    return (s / (s.max() * s.min()).sqrt()).float()


@dataclass
class ScaleChoice:
    alpha: float
    family: str  # "x": mean|x|^α; "duo": mean|x|^α / mean|ŵ|^(1-α)
    scales: torch.Tensor  # per fold-source channel
    error: float


def search_scale(group: LinearGroup, stats: dict, weights: dict, grams: dict, specs: dict,
                 steps: int, max_rows: int = 256, duo: bool = True) -> ScaleChoice:
    """The α (and per-source-channel scales) minimising the group's summed output error,
    estimated on at most `max_rows` evenly spaced output rows of each Linear (the α is a
    statistic over rows; the error products dominate the run time). With `duo` the candidates
    of both families are tried; α = 0 of the x family (s = 1, RTN) is always among them."""
    x_mean = _source_mean_abs(group, stats)
    w_mean = _weight_mean(group, weights, specs) if duo else None
    weights = {n: _row_sample(weights[n], max_rows) for n in group.names}
    best = ScaleChoice(0.0, "x", None, float("inf"))  # type: ignore[arg-type]
    for family, wm in [("x", None), ("duo", w_mean)] if duo else [("x", None)]:
        for i in range(steps + 1):
            alpha = i / steps
            if family == "duo" and i == steps:
                continue  # the same scales as the x family's α = 1
            s_source = scales_for(x_mean, alpha, wm)
            s = s_source[group.fold.source]
            err = sum(output_error(fake_quantize(weights[n] * s, specs[n]) / s - weights[n], grams[n])
                      for n in group.names)
            if err < best.error:
                best = ScaleChoice(alpha, family, s_source, err)
    return best


def _row_sample(w: torch.Tensor, max_rows: int) -> torch.Tensor:
    if w.shape[0] <= max_rows:
        return w
    step = w.shape[0] / max_rows
    return w[[int(i * step) for i in range(max_rows)]]


def _apply_fold(layer: nn.Module, group: LinearGroup, s_source: torch.Tensor, col_scale: dict,
                row_scale: dict) -> None:
    """Divide the producing op's channels by s and multiply the group's input columns by s."""
    from orstack.architectures import fold_into_producer

    fold = group.fold
    fold_into_producer(layer, fold, s_source)
    if fold.kind == "rows" and fold.module in row_scale:
        stop = fold.start + fold.n_source
        scale = row_scale[fold.module].clone()
        scale[fold.start:stop] = scale[fold.start:stop] * s_source
        row_scale[fold.module] = scale
    s = s_source[fold.source]
    for name in group.names:
        module = layer.get_submodule(name)
        module.weight.data.mul_(s.to(module.weight.dtype))
        col_scale[name] = col_scale[name] * s


def sensitivities(model: nn.Module, input_ids: torch.Tensor, cfg: AWQConfig, sizes: dict[str, int],
                  widths: tuple[int, ...], progress: Any = None) -> dict[str, dict[int, float]]:
    """Activation-weighted sensitivity of every Linear at each width: the relative output error
    tr(Δ G Δᵀ) / tr(W G Wᵀ) of RTN, on the dense model's calibration inputs."""
    import torch

    from orstack.layerwise import (
        capture_layer_inputs,
        decoder_layers,
        held,
        linear_modules,
        record_input_stats,
        run_layer,
    )

    inputs = capture_layer_inputs(model, input_ids, cfg.batch_size)
    out: dict[str, dict[int, float]] = {}
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        with held(model, layer):
            prefix = _layer_prefix(model, i)
            modules = linear_modules(layer)
            with record_input_stats(modules, hessian=True) as stats:
                inputs = run_layer(layer, inputs)
            with torch.no_grad():
                for name, module in modules.items():
                    w, gram = module.weight.data.float(), stats[name].hessian()
                    base = max(output_error(w, gram), 1e-30)
                    full = f"{prefix}.{name}"
                    specs = {b: QuantSpec(b, sizes[full], cfg.symmetric) for b in widths}
                    out[full] = {b: output_error(fake_quantize(w, spec) - w, gram) / base
                                 for b, spec in specs.items()}
        if progress is not None:
            progress(i + 1, len(layers))
    return out


def allocate_bits(sens: dict[str, dict[int, float]], params: dict[str, int], target: int,
                  promote_fraction: float) -> dict[str, int]:
    """Give `target`+1 bits to the Linears where one more bit removes the most relative error per
    parameter (up to `promote_fraction` of the parameters), then `target`-1 bits to those where
    one bit less costs the least per parameter, until the parameter-weighted average is <= target."""
    hi, lo = min(target + 1, 8), max(target - 1, 2)
    bits = {name: target for name in sens}
    total = sum(params.values())
    if hi > target:
        gain = sorted(sens, key=lambda n: (-(sens[n][target] - sens[n][hi]) / params[n], n))
        promoted = 0
        for name in gain:
            if promoted + params[name] > promote_fraction * total:
                continue
            bits[name] = hi
            promoted += params[name]
    cost = sorted((n for n in sens if bits[n] == target),
                  key=lambda n: ((sens[n][lo] - sens[n][target]) / params[n], n))
    excess = sum((bits[n] - target) * params[n] for n in sens)
    for name in cost:
        if excess <= 0:
            break
        bits[name] = lo
        excess -= params[name] * (target - lo)
    return bits
