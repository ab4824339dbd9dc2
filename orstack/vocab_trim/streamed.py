"""vocab-trim on a model read tensor by tensor (orstack.layerwise.StreamedModel).

Only the embedding and output rows change, so the trim itself is a copy: every tensor is read
from the checkpoint and written to the output's shards as stored, the embedding and output
matrices (and an output bias) keeping the kept ids' rows. The trimmed model the validation
measures is a streamed model over those shards, so held-out perplexity before and after also
runs a layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from orstack.vocab_trim.trim import TrimPlan


def streamed_slicer(staging: Path) -> Callable[[nn.Module, TrimPlan], nn.Module]:
    """The `slicer` of `vocab_trim` for a streamed model: writes the trimmed weights and config to
    `staging` and returns the trimmed model, streamed from there."""

    def slice_streamed(model: nn.Module, plan: TrimPlan) -> nn.Module:
        import copy

        import torch

        from orstack.errors import BadInput
        from orstack.io.safetensors_file import ShardedWriter
        from orstack.layerwise import load_streamed, param_shape, stream_of
        from orstack.vocab_trim.trim import remap_token_ids

        stream = stream_of(model)
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        rows = param_shape(model, emb.weight)[0]
        if rows <= plan.kept[-1]:
            raise BadInput(f"model: embedding has {rows} rows but the tokenizer uses id {plan.kept[-1]}")
        sliced = {id(p) for m in (emb, out) if m is not None for p in m.parameters(recurse=False)}
        index = torch.tensor(plan.kept)
        writer = ShardedWriter(staging, metadata={"format": "pt"})
        for name, (param, _) in stream.params.items():
            tensor = stream.tensor(name)
            writer.add(name, tensor.index_select(0, index) if id(param) in sliced else tensor)
        writer.close()
        config = copy.deepcopy(model.config)
        config.vocab_size = len(plan.kept)
        remap_token_ids(config, plan.old_to_new)
        config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            generation = copy.deepcopy(model.generation_config)
            remap_token_ids(generation, plan.old_to_new)
            generation.save_pretrained(staging)
        trimmed, _ = load_streamed(staging, device=stream.device, dtype=None, with_tokenizer=False)
        return trimmed

    return slice_streamed
