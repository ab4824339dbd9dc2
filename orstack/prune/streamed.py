"""`prune` on a model read layer by layer (orstack.layerwise.StreamedModel).

The same algorithm as `prune_in_place` for a one-stage prune -- the calibration windows, the
per-layer statistics, the masks are computed identically, so the weights written are the
same bits -- but each decoder layer is read from the checkpoint when its turn comes, pruned,
written to the output's shards in the checkpoint's dtype and dropped. The held-out perplexity
before and after is measured inside the same sweep (orstack.layerwise.SweepPerplexity: the
held-out windows go through each layer before and after it is pruned), so the checkpoint is
read once, not three times (before, prune, after), and the output is not read back. Gradual
schedules, the recovery fine-tune and the grid change the whole model repeatedly, so they
load it whole.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from orstack.prune.stage import PruneConfig


def can_stream_prune(config: PruneConfig) -> bool:
    return config.gradual == 1 and config.recover is None and config.grid is None


def prune_streamed(model: nn.Module, tokenizer: Any, config: PruneConfig, staging: Path, *,
                   calib_texts: list[str], heldout_texts: list[str] | None = None,
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """Prune the streamed `model`, writing its weights to `staging`; returns the pruned model (a
    streamed model over `staging`) and the manifest metrics `prune_in_place` gives."""
    from orstack.architectures import layer_prefix
    from orstack.console import info
    from orstack.io.safetensors_file import ShardedWriter
    from orstack.layerwise import (
        SweepPerplexity,
        decoder_layers,
        linear_modules,
        load_streamed,
        stream_of,
        write_stored,
    )
    from orstack.prune.core import prune_model
    from orstack.prune.stage import evaluation_setup
    from orstack.prune.storage import add_tensor, sparse_writer

    stream = stream_of(model)
    setup = evaluation_setup(model, tokenizer, config, calib_texts, heldout_texts)
    start = time.perf_counter()
    before = SweepPerplexity(model, tokenizer, setup.eval_texts, setup.eval_length)
    after = before.copy()
    head = model.get_output_embeddings()
    ppl: dict[str, float] = {}

    def before_unit(unit: nn.Module) -> None:
        if unit is head:  # lm_head about to be pruned: the model before is complete
            ppl["before"] = before.ppl(model)
        else:
            before.advance(unit)

    spec = config.spec()
    sparse_names = {f"{layer_prefix(model, i)}.{name}.weight"
                    for i, layer in enumerate(decoder_layers(model)) for name in linear_modules(layer)}
    if spec.lm_head:
        sparse_names.add("lm_head.weight")
    writer = sparse_writer(staging) if config.compress else ShardedWriter(staging, metadata={"format": "pt"})
    sizes = {"stored": 0, "dense": 0, "sparse": 0}

    def write(unit: nn.Module) -> None:
        for name in stream.names(unit):
            t = stream.params[name][0].data.to(stream.stored_dtype(name))
            sparse = config.compress and name in sparse_names
            stored = add_tensor(writer, name, t, sparse)
            sizes["stored"] += stored
            sizes["dense"] += t.numel() * t.element_size()
            sizes["sparse"] += int(stored < t.numel() * t.element_size())
        if unit is head:  # pruned, and dropped when this returns
            ppl["after"] = after.ppl(model)
        else:
            after.advance(unit)

    prune_start = time.perf_counter()
    report = prune_model(model, setup.calib_ids, spec, on_unit=write, before_unit=before_unit)
    ppl_before = ppl["before"] if "before" in ppl else before.ppl(model)
    info(f"perplexity before pruning: {ppl_before:.3f} ({setup.ppl_on})")
    ppl_after = ppl["after"] if "after" in ppl else after.ppl(model)
    info(f"perplexity after pruning: {ppl_after:.3f}")
    copied = write_stored(stream, writer)
    sizes["stored"] += copied
    sizes["dense"] += copied
    files = writer.close()
    prune_seconds = time.perf_counter() - prune_start
    model.config.save_pretrained(staging)
    pruned, _ = load_streamed(staging, device=stream.device, dtype=config.dtype, with_tokenizer=False)
    metrics: dict[str, Any] = {
        "method": config.method,
        "pattern": spec.pattern_text,
        "sparsity": report.sparsity,
        "layer_sparsity": report.layers,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_on": setup.ppl_on,
        "ppl_max_length": setup.eval_length,
        "nsamples": config.nsamples,
        "seqlen": setup.seqlen,
        "weight_bytes": sizes["stored"],
        "dense_weight_bytes": sizes["dense"],
        "prune_seconds": round(prune_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "streamed": True,
    }
    if config.compress:
        metrics.update({"stored_bytes": sum(f.stat().st_size for f in files), "dense_bytes": sizes["dense"],
                        "sparse_matrices": sizes["sparse"]})
    return pruned, metrics
