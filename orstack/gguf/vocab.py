"""A Hugging Face tokenizer as GGUF vocabulary metadata (`tokenizer.ggml.*`).

Byte-level BPE tokenizers become llama.cpp's "gpt2" vocabulary: tokens, token types,
merges as "a b" strings. llama.cpp does not run the pre-tokenizer written in
tokenizer.json; it runs one of its own built-in regex sets, chosen by the name in
`tokenizer.ggml.pre`, and refuses names it does not know. So the name is derived from
what the pre-tokenizer *does*: its split regexes are compared with the regex sets behind
llama.cpp's names (not with a table of vocabulary hashes, so trimmed and custom
tokenizers convert). A pre-tokenizer that isolates literal keywords and otherwise
single characters (orstack's tiny default) has no llama.cpp regex; it is reproduced
exactly by marking each keyword token USER_DEFINED (llama.cpp matches those literally
before any regex) and keeping only merges inside one character, which no regex can split.
Anything else is refused with a message saying which regex has no llama.cpp counterpart.

SentencePiece-style BPE (byte fallback, '▁' for spaces, <0xXX> byte tokens: Llama 2,
Mistral) becomes llama.cpp's "llama" vocabulary, each token scored by minus the rank of
the merge that creates it, so llama.cpp's highest-score-first merging follows the BPE.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from orstack.errors import BadInput

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer name -> the sequence of split regexes (as tokenizer.json writes them)
# that its built-in regex set reproduces.
LLAMA_CPP_PRE = {
    "gpt-2": (GPT2_REGEX,),
    "smollm": (r"\p{N}", GPT2_REGEX),  # same regex set as "starcoder"
    "llama-bpe": (LLAMA3_REGEX,),
    "qwen2": (QWEN2_REGEX,),
}
ANY_CHAR = {r"[\s\S]", r"[\S\s]", r"(?s:.)", r"(?s).", r"\X"}


@dataclass
class GgufVocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    add_space_prefix: bool = False
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.model == "llama":
            writer.add_add_space_prefix(self.add_space_prefix)
        for setter, value in ((writer.add_bos_token_id, self.bos_id), (writer.add_eos_token_id, self.eos_id),
                              (writer.add_unk_token_id, self.unk_id), (writer.add_pad_token_id, self.pad_id)):
            if value is not None:
                setter(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _split_regexes(pre: dict[str, Any] | None, where: str) -> list[str]:
    """The regexes a pre-tokenizer splits with, in order (ByteLevel's own regex included)."""
    if pre is None:
        return []
    kind = pre.get("type")
    if kind == "Sequence":
        return [r for p in pre["pretokenizers"] for r in _split_regexes(p, where)]
    if kind == "ByteLevel":
        return [GPT2_REGEX] if pre.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}"] if pre.get("individual_digits") else [r"\p{N}+"]
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex")
        if regex is None:
            regex = re.escape(pattern.get("String", ""))
        if pre.get("invert") or str(pre.get("behavior", "")).lower() != "isolated":
            raise BadInput(f"{where}: pre-tokenizer Split({regex!r}, behavior={pre.get('behavior')}, "
                           f"invert={pre.get('invert')}) has no llama.cpp equivalent")
        return [regex]
    raise BadInput(f"{where}: pre-tokenizer '{kind}' has no llama.cpp equivalent for a byte-level BPE vocabulary")


def _alternatives(regex: str) -> list[str]:
    """Top-level alternatives of a regex (| outside brackets and groups)."""
    parts, depth, in_class, current, i = [], 0, False, "", 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            current += regex[i : i + 2]
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(current)
            current = ""
            i += 1
            continue
        current += c
        i += 1
    parts.append(current)
    return parts


def _literal(alternative: str) -> str | None:
    """The text a regex alternative matches if it is a plain literal, else None."""
    out, i = "", 0
    while i < len(alternative):
        c = alternative[i]
        if c == "\\":
            if i + 1 >= len(alternative) or alternative[i + 1].isalnum():
                return None  # \d, \s, \p{..}: a class, not a literal
            out += alternative[i + 1]
            i += 2
            continue
        if c in ".^$*+?()[]{}|":
            return None
        out += c
        i += 1
    return out or None


def _character_split_literals(regexes: list[str]) -> list[str] | None:
    """For a single regex `lit1|lit2|...|<any character>`, the literals; else None."""
    if len(regexes) != 1:
        return None
    alternatives = _alternatives(regexes[0])
    if alternatives[-1] not in ANY_CHAR:
        return None
    literals = [_literal(a) for a in alternatives[:-1]]
    return None if any(lit is None for lit in literals) else literals  # type: ignore[return-value]


def _byte_decoder() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _within_one_character(token: str, decoder: dict[str, int]) -> bool:
    """True if a byte-level token's bytes hold at most one UTF-8 character start."""
    try:
        data = [decoder[ch] for ch in token]
    except KeyError:
        return False
    return sum(1 for b in data if b & 0xC0 != 0x80) <= 1


def _merge_strings(merges: list[Any]) -> list[str]:
    # tokenizers >= 0.20 saves merges as [a, b] pairs; GGUF wants "a b".
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds_token(tokenizer, token_id: int | None, position: int) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 1 and ids[position] == token_id


def _tokens_by_id(spec: dict, n_vocab: int, where: str) -> tuple[dict[int, dict], dict[int, str]]:
    """(added tokens by id, every token's text by id), checked against the embedding's rows."""
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    size = max(by_id) + 1
    if size > n_vocab:
        raise BadInput(f"{where}: tokenizer has {size} tokens but the model's embedding only {n_vocab} rows")
    return added, by_id


def build_vocab(tokenizer, n_vocab: int, where: str = "tokenizer") -> GgufVocab:
    """GGUF vocabulary for a fast Hugging Face tokenizer, padded to the model's `n_vocab` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise BadInput(f"{where}: only fast (tokenizer.json) tokenizers can be converted")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise BadInput(f"{where}: tokenizer model '{model.get('type')}' is not supported (byte-level BPE only)")
    if model.get("byte_fallback"):
        return _sentencepiece_vocab(tokenizer, spec, n_vocab, where)
    decoder = _byte_decoder()
    regexes = _split_regexes(spec.get("pre_tokenizer"), where)
    added, by_id = _tokens_by_id(spec, n_vocab, where)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [NORMAL if i in by_id else UNUSED for i in range(n_vocab)]
    for i, t in added.items():
        types[i] = CONTROL if t.get("special") else USER_DEFINED
    merges = _merge_strings(model.get("merges", []))
    notes: list[str] = []

    pre = next((name for name, regs in LLAMA_CPP_PRE.items() if list(regs) == regexes), None)
    if pre is None:
        literals = _character_split_literals(regexes)
        if literals is None:
            shown = " + ".join(regexes) or "(none)"
            raise BadInput(f"{where}: no llama.cpp pre-tokenizer reproduces the split regex {shown[:200]!r}; "
                           f"llama.cpp supports {', '.join(LLAMA_CPP_PRE)} for byte-level BPE here")
        pre = "gpt-2"
        for lit in literals:
            ids = tokenizer(lit, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise BadInput(f"{where}: pre-tokenizer literal {lit!r} is not a single token; "
                               "llama.cpp cannot reproduce this split")
            tokens[ids[0]] = lit  # USER_DEFINED tokens are matched (and printed) as raw text
            types[ids[0]] = USER_DEFINED
        kept = [m for m in merges if _within_one_character(m.replace(" ", ""), decoder)]
        notes.append(f"pre-tokenizer splits single characters and {len(literals)} literal(s): literals written "
                     f"as user-defined tokens, {len(merges) - len(kept)} merge(s) only reachable inside them dropped")
        # llama.cpp refuses a vocabulary without merges; this one can never apply (no merge
        # builds its left side, and initial symbols are single characters).
        merges = kept or ["<orstack:no-merge> <orstack:no-merge>"]
        overlaps = [(a, b) for a in literals for b in literals if a != b and _overlap(a, b)]
        if overlaps:
            notes.append(f"literals {overlaps[0]} overlap: llama.cpp matches the longest first, which can differ")
    return GgufVocab(
        model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id,
        add_bos=_adds_token(tokenizer, tokenizer.bos_token_id, 0),
        add_eos=_adds_token(tokenizer, tokenizer.eos_token_id, -1),
        chat_template=tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None,
        notes=notes,
    )


def _overlap(a: str, b: str) -> bool:
    """A proper suffix of `a` is a prefix of `b`, or `b` occurs inside `a`."""
    return b in a or any(a.endswith(b[:k]) for k in range(1, min(len(a), len(b))))


def _space_prefix(spec: dict[str, Any], where: str) -> bool:
    """Whether a SentencePiece-style tokenizer prepends '▁' (llama.cpp's add_space_prefix).

    Accepted: Metaspace (pre-tokenizer), or a normalizer of Prepend('▁') and Replace(' ', '▁')."""
    pre = spec.get("pre_tokenizer")
    norm = spec.get("normalizer")
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [st.get("type") for st in steps]
    if pre and pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never" and pre.get("add_prefix_space", True)
    if pre is None and set(kinds) <= {"Prepend", "Replace"} and "Replace" in kinds:
        return "Prepend" in kinds
    raise BadInput(f"{where}: SentencePiece-style tokenizer with normalizer {kinds} and pre-tokenizer "
                   f"{pre.get('type') if pre else None} has no llama.cpp equivalent")


def _sentencepiece_vocab(tokenizer, spec: dict[str, Any], n_vocab: int, where: str) -> GgufVocab:
    """llama.cpp's "llama" (SentencePiece) vocabulary for a BPE with byte fallback.

    llama.cpp merges the adjacent pair whose concatenation is the vocabulary token with the
    highest score; scoring each token by minus the rank of the merge that creates it makes
    that the same order as the BPE merges."""
    model = spec["model"]
    added, by_id = _tokens_by_id(spec, n_vocab, where)
    rank: dict[str, int] = {}
    for r, merge in enumerate(_merge_strings(model.get("merges", []))):
        left, right = merge.split(" ", 1)
        rank.setdefault(left + right, r)
    never = -1e9  # multi-character tokens no merge creates: merged last, if ever
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(never)
            continue
        tokens.append(text)
        if i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif text == model.get("unk_token"):
            types.append(UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        scores.append(-float(rank[text]) if text in rank else (0.0 if len(text) == 1 else never))
    return GgufVocab(
        model="llama", pre=None, tokens=tokens, types=types, merges=[], scores=scores,
        add_space_prefix=_space_prefix(spec, where),
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id,
        add_bos=_adds_token(tokenizer, tokenizer.bos_token_id, 0),
        add_eos=_adds_token(tokenizer, tokenizer.eos_token_id, -1),
        chat_template=tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None,
        notes=["SentencePiece-style BPE with byte fallback: written as llama.cpp's 'llama' vocabulary, "
               "scores from merge ranks"],
    )
