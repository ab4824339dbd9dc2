"""`orstack vocab-trim --dry-run`: the kept vocabulary and the sliced tensors, from the tokenizer,
the corpus, the config and the safetensors headers (no tensor data is read)."""

from __future__ import annotations

import math
from pathlib import Path

from orstack.plan import Plan, TensorPlan, checkpoint_headers, keep_row, meta_tensors, stored_float_bytes
from orstack.vocab_trim.trim import VocabTrimConfig, check_corpus, plan_trim, read_keep_file


def plan(source: str | Path, config: VocabTrimConfig) -> Plan:
    """What `orstack vocab-trim` would keep: the token count, and every tensor with a vocabulary
    dimension (input embedding, output rows and bias) cut to it; the rest unchanged."""
    from orstack.architectures import weightless_model
    from orstack.io.checkpoint import check_checkpoint, checkpoint_directory, load_config, load_tokenizer
    from orstack.io.text import check_text_files
    from orstack.vocab_trim.stage import _generation_config

    config.check()
    check_text_files(config.corpus, "--corpus")
    resolved = check_checkpoint(source)
    check_corpus(config.corpus)
    if config.keep is not None:
        read_keep_file(config.keep)
    tokenizer = load_tokenizer(source)
    model_config = load_config(source)
    trim = plan_trim(tokenizer, [model_config, _generation_config(checkpoint_directory(resolved))], config)
    directory = checkpoint_directory(resolved)
    headers = checkpoint_headers(directory) if isinstance(directory, Path) else {}
    width = stored_float_bytes(headers, model_config)
    model = weightless_model(model_config)
    vocab = model.get_input_embeddings().weight.shape[0]
    kept = len(trim.kept)
    result = Plan("vocab-trim", str(source), bytes_in=sum(t.nbytes for t in headers.values()))
    result.notes.append(f"vocabulary {vocab:,} -> {kept:,} tokens, covering {trim.coverage:.4%} of the corpus' "
                        f"{trim.corpus_tokens:,} token occurrences ({trim.corpus_distinct:,} distinct)")
    for name, shape in meta_tensors(model).items():
        if shape and shape[0] == vocab and ("embed" in name or "lm_head" in name or "wte" in name):
            new_shape = (kept, *shape[1:])
            result.tensors.append(TensorPlan(name, new_shape, f"rows {vocab} -> {kept}", 8.0 * width,
                                             math.prod(new_shape) * width, f"{vocab - kept:,} rows cut"))
        else:
            result.tensors.append(keep_row(name, shape, width))
    return result
