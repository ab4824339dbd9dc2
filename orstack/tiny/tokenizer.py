"""The tiny default's tokenizer: byte-level BPE where only the task keywords merge.

Digits and letters stay single tokens (a number's digits line up with the model's
positions, which is what makes carrying learnable at this size); the keywords (`rev `,
`sort `, ...) become one token each. Built explicitly from the byte alphabet and the
keyword merges rather than trained, so it is identical for every seed and corpus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orstack.tiny.tasks import KEYWORDS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def _keyword_merges(keywords: tuple[str, ...], to_bytes: dict[int, str]) -> list[tuple[str, str]]:
    """Left-to-right merges that build each keyword (in byte-level form) from its bytes."""
    merges: list[tuple[str, str]] = []
    for word in keywords:
        symbols = [to_bytes[b] for b in word.encode("utf-8")]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
    return merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tokenizer(keywords: tuple[str, ...] = KEYWORDS) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer: 3 specials + 256 bytes + the keyword merges.

    Encoding a text prepends BOS (the model is trained with it), so `tokenizer(prompt)`
    gives exactly what the model saw during training.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    to_bytes = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in (BOS, EOS, PAD, *(to_bytes[b] for b in range(256))):
        vocab[token] = len(vocab)
    merges = _keyword_merges(keywords, to_bytes)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # Split into keywords and single characters; BPE can then only merge inside a keyword.
    alternatives = "|".join(_regex_escape(k) for k in sorted(keywords, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(f"{alternatives}|[\\s\\S]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=128)


def _regex_escape(text: str) -> str:
    return "".join(f"\\{c}" if not c.isalnum() and c != " " else c for c in text)
