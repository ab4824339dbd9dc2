"""Byte-level BPE vocabularies: which tokens to keep, and the tokenizer rebuilt without the rest.

Why the merge closure keeps tokenization unchanged: BPE applies, at each step, the
lowest-ranked merge that matches. Keep every token that *any* merge producing a kept token
needs (its inputs, recursively) and keep exactly the merges whose inputs and result are all
kept, in their original order. For a word whose original tokens are all kept, every merge the
original run applied produced an ancestor of a kept token, so it is kept; and the kept merges
are a rank-ordered subset, so at every step the lowest-ranked match is the same one. The run
is identical. Words that used a dropped token stop merging earlier (down to the 256 byte
tokens at worst), so every input still encodes and decodes exactly.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from orstack.errors import BadInput


@dataclass
class ByteLevelBPE:
    """The parts of a tokenizer.json that trimming reads, with the original JSON kept whole."""

    data: dict[str, Any]  # the parsed tokenizer.json
    vocab: dict[str, int]  # model.vocab
    merges: list[tuple[str, str]]  # in rank order
    merges_as_strings: bool  # "a b" (older files) rather than ["a", "b"]
    added: dict[str, int]  # added_tokens content -> id

    @property
    def size(self) -> int:
        ids = list(self.vocab.values()) + list(self.added.values())
        return max(ids) + 1 if ids else 0

    def id_to_token(self) -> dict[int, str]:
        table = {i: t for t, i in self.vocab.items()}
        table.update({i: t for t, i in self.added.items()})
        return table


def _types(node: Any) -> list[str]:
    """Every component `type` in a (possibly nested Sequence) pre-tokenizer/decoder."""
    if not isinstance(node, dict):
        return []
    found = [node.get("type", "")]
    for child in node.get("pretokenizers", []) + node.get("decoders", []):
        found += _types(child)
    return found


def parse_tokenizer_json(text: str, where: str = "tokenizer") -> ByteLevelBPE:
    """Parse tokenizer.json; anything but byte-level BPE is refused (it cannot be trimmed safely)."""
    data = json.loads(text)
    model = data.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise BadInput(f"{where}: vocab-trim needs a byte-level BPE tokenizer, this one is {kind or 'unknown'}")
    if "ByteLevel" not in _types(data.get("pre_tokenizer")) or "ByteLevel" not in _types(data.get("decoder")):
        detail = "SentencePiece-style BPE with byte fallback" if model.get("byte_fallback") else "BPE without ByteLevel"
        raise BadInput(f"{where}: vocab-trim needs a byte-level BPE tokenizer (GPT-2/Llama-3/SmolLM/Qwen style), "
                       f"this one is {detail}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise BadInput(f"{where}: BPE with subword prefixes/suffixes or dropout is not supported by vocab-trim")
    raw = model.get("merges", [])
    as_strings = bool(raw) and isinstance(raw[0], str)
    merges = [tuple(m.split(" ", 1)) if as_strings else tuple(m) for m in raw]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return ByteLevelBPE(data=data, vocab=dict(model.get("vocab", {})), merges=merges,  # type: ignore[arg-type]
                        merges_as_strings=as_strings, added=added)


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE maps bytes to (GPT-2's bytes_to_unicode)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def count_tokens(tokenizer: Any, texts: Iterable[str], batch: int = 256) -> Iterator[Counter]:
    """Token-id counts of each batch of texts (a `tokenizers.Tokenizer`, no special tokens added)."""
    pending: list[str] = []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield Counter(i for enc in tokenizer.encode_batch(pending, add_special_tokens=False) for i in enc.ids)
            pending = []
    if pending:
        yield Counter(i for enc in tokenizer.encode_batch(pending, add_special_tokens=False) for i in enc.ids)


class MergeClosure:
    """Adds a token together with every token a merge producing it needs (recursively)."""

    def __init__(self, bpe: ByteLevelBPE) -> None:
        self.vocab = bpe.vocab
        self.producers: dict[int, list[tuple[int, int]]] = {}
        for a, b in bpe.merges:
            if a in bpe.vocab and b in bpe.vocab and a + b in bpe.vocab:
                self.producers.setdefault(bpe.vocab[a + b], []).append((bpe.vocab[a], bpe.vocab[b]))

    def closure(self, token_id: int, kept: set[int]) -> set[int]:
        """The ids `token_id` brings in that `kept` does not already hold."""
        new: set[int] = set()
        stack = [token_id]
        while stack:
            t = stack.pop()
            if t in kept or t in new:
                continue
            new.add(t)
            for a, b in self.producers.get(t, ()):
                stack += [a, b]
        return new


def required_closure(required: set[int], closure: MergeClosure, max_vocab: int | None) -> set[int]:
    """`required` closed under merges; more than `max_vocab` ids is bad input (known before counting)."""
    kept: set[int] = set()
    for t in sorted(required):
        kept |= closure.closure(t, kept)
    if max_vocab is not None and len(kept) > max_vocab:
        raise BadInput(f"--max-vocab {max_vocab} is smaller than the {len(kept)} tokens that must be kept "
                       "(special tokens, the 256 byte tokens, --keep tokens and their merges)")
    return kept


def select_tokens(counts: Counter, required: set[int], closure: MergeClosure, *, coverage: float | None,
                  max_vocab: int | None) -> tuple[set[int], float]:
    """The kept ids: `required` (closed under merges), then corpus tokens by frequency (each with
    its closure) until `coverage` of occurrences is reached or `max_vocab` ids are kept.

    Returns (kept ids, share of corpus token occurrences the kept ids cover).
    """
    kept = required_closure(required, closure, max_vocab)
    total = sum(counts.values())
    covered = sum(n for t, n in counts.items() if t in kept)
    for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if coverage is not None and covered >= coverage * total:
            break
        if t in kept:
            continue
        new = closure.closure(t, kept)
        if max_vocab is not None and len(kept) + len(new) > max_vocab:
            continue
        kept |= new
        covered += sum(counts.get(i, 0) for i in new)
    return kept, (covered / total if total else 1.0)


def old_to_new_ids(kept: set[int], old_size: int) -> list[int | None]:
    """New ids in the original order: old id -> new id (None when dropped)."""
    table: list[int | None] = [None] * old_size
    for new, old in enumerate(sorted(kept)):
        table[old] = new
    return table


def _remap_post_processor(node: Any, token_id: dict[str, int]) -> Any:
    """Rewrite the special-token ids a post-processor carries (Template, Bert, Roberta, Sequence)."""
    if isinstance(node, list):
        return [_remap_post_processor(n, token_id) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "special_tokens" and isinstance(value, dict):
            out[key] = {name: {**spec, "ids": [token_id[t] for t in spec.get("tokens", [])]}
                        for name, spec in value.items()}
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            out[key] = [value[0], token_id[value[0]]]
        else:
            out[key] = _remap_post_processor(value, token_id)
    return out


def trimmed_tokenizer_json(bpe: ByteLevelBPE, old_to_new: list[int | None]) -> tuple[str, int]:
    """tokenizer.json with the kept vocabulary renumbered, and the kept merges in their order.

    Returns (JSON text, number of merges kept).
    """
    data = copy.deepcopy(bpe.data)
    vocab = {t: old_to_new[i] for t, i in bpe.vocab.items() if old_to_new[i] is not None}
    merges = [(a, b) for a, b in bpe.merges if a in vocab and b in vocab and a + b in vocab]
    data["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda item: item[1]))
    data["model"]["merges"] = [f"{a} {b}" for a, b in merges] if bpe.merges_as_strings else [[a, b] for a, b in merges]
    for token in data.get("added_tokens", []):
        token["id"] = old_to_new[token["id"]]
    token_id = {**vocab, **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    if data.get("post_processor") is not None:
        data["post_processor"] = _remap_post_processor(data["post_processor"], token_id)
    padding = data.get("padding")
    if isinstance(padding, dict) and padding.get("pad_token") in token_id:
        padding["pad_id"] = token_id[padding["pad_token"]]
    return json.dumps(data, ensure_ascii=False), len(merges)
