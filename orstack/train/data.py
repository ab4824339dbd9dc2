"""Tokenising training rows with the prompt masked out of the loss.

A Training Example (`prompt`, `response`) becomes prompt tokens + response tokens + EOS
with labels -100 on the prompt, so the loss is on the response only. The prompt and the
response are tokenised separately and concatenated, so a merge across their boundary
cannot move the mask. A row with only `text` is trained on every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orstack.errors import BadInput
from orstack.train.losses import IGNORE


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    weight: float = 1.0


def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int, weight: float = 1.0) -> Encoded:
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return Encoded(ids, labels, weight)


def encode_text(tokenizer: Any, text: str, max_length: int, weight: float = 1.0) -> Encoded:
    ids = tokenizer(text)["input_ids"][:max_length]
    return Encoded(ids, list(ids), weight)


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], max_length: int, where: str = "data") -> list[Encoded]:
    """Encode prompt/response rows (or `text` rows); `weight` (default 1) scales a row's loss."""
    out = []
    for n, row in enumerate(rows, 1):
        weight = float(row.get("weight", 1.0))
        if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            out.append(encode_example(tokenizer, row["prompt"], row["response"], max_length, weight))
        elif isinstance(row.get("text"), str):
            out.append(encode_text(tokenizer, row["text"], max_length, weight))
        else:
            raise BadInput(f"{where}: row {n}: needs 'prompt' and 'response' (or 'text')")
    return out


def read_examples(path: str) -> list[dict[str, Any]]:
    """Training rows from a JSONL file ('-': standard input), each checked before any model loads:
    string `prompt` and `response`, or a string `text`; a numeric `weight` when given. Errors name
    file:line and the field."""
    from orstack.io.jsonl import display_name, read_jsonl_numbered

    name = display_name(path)
    rows = []
    for lineno, row in read_jsonl_numbered(path):
        where = f"{name}:{lineno}"
        check_example(row, where)
        rows.append(row)
    if not rows:
        raise BadInput(f"{name}: no rows")
    return rows


def check_example(row: dict[str, Any], where: str) -> None:
    """A Training Example (`prompt`, `response`) or a plain `{"text": ...}` row; BadInput naming the field."""
    needed = ("text",) if "text" in row and "prompt" not in row and "response" not in row else ("prompt", "response")
    for name in needed:
        value = row.get(name)
        if value is None:
            raise BadInput(f"{where}: missing required field '{name}' (rows need 'prompt' and 'response', "
                           "or 'text')")
        if not isinstance(value, str):
            raise BadInput(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
    weight = row.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise BadInput(f"{where}: field 'weight': expected a number, got {type(weight).__name__}")


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding), weights."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}
