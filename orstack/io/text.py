"""Plain-text inputs: corpora for perplexity, calibration and vocabulary statistics.

A `.jsonl` file contributes one document per row (its `text` field, or
prompt + response/answer/output); any other file is one UTF-8 document.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from orstack.errors import BadInput
from orstack.io.jsonl import check_input_file, display_name, read_jsonl_numbered, read_text

if TYPE_CHECKING:
    import torch

TEXT_FIELDS = ("text",)
PAIR_FIELDS = (("prompt", "response"), ("prompt", "answer"), ("prompt", "output"))


def row_text(row: dict, where: str) -> str:
    """The text a JSONL row stands for: `text`, or prompt followed by its response."""
    for field in TEXT_FIELDS:
        if isinstance(row.get(field), str):
            return row[field]
    for first, second in PAIR_FIELDS:
        if isinstance(row.get(first), str) and row.get(second) is not None:
            return f"{row[first]}{row[second]}"
    raise BadInput(f"{where}: no 'text' field (nor prompt with response/answer/output)")


def read_texts(paths: str | Path | Sequence[str | Path]) -> Iterator[str]:
    """Stream the documents of one or more text / JSONL files (`-` is stdin). A file that
    holds no text at all is bad input naming it."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise BadInput("no text file given")
    for path in paths:
        name = display_name(path)
        found = False
        if str(path).endswith(".jsonl"):
            for lineno, row in read_jsonl_numbered(path):
                text = row_text(row, f"{name}:{lineno}")
                found = found or bool(text.strip())
                yield text
        else:
            text = read_text(path)
            found = bool(text.strip())
            yield text
        if not found:
            raise BadInput(f"{name}: holds no text")


def check_text_files(paths: Iterable[str | Path], option: str) -> list[Path]:
    """Fail early (before any model loads) when a text input is missing, a directory or empty."""
    checked = [Path(check_input_file(p, option)) for p in paths]
    if not checked:
        raise BadInput(f"{option}: at least one file is required")
    return checked


def concatenated_ids(tokenizer, texts: Iterable[str]) -> list[int]:
    """Token ids of all documents, each ended by EOS so windows can span documents."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return ids


def token_windows(tokenizer, texts: Iterable[str], n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n` calibration windows of `seqlen` tokens at seeded random offsets (as GPTQ/AWQ sample
    their calibration data), as a LongTensor [n, seqlen]."""
    import torch

    ids = concatenated_ids(tokenizer, texts)
    if len(ids) < seqlen:
        raise BadInput(f"calibration text has only {len(ids)} tokens; --seqlen {seqlen} needs at least that many")
    rng = random.Random(seed)
    last_start = len(ids) - seqlen
    starts = [rng.randint(0, last_start) for _ in range(n)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)


def check_seqlen(model, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise BadInput(f"--seqlen {seqlen} exceeds the model's context of {limit} tokens")
