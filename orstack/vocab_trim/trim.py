"""vocab-trim: keep the tokens a corpus uses, cut the embedding and output rows of the rest.

`plan_trim` counts the corpus and chooses the kept ids; `apply_trim` slices the model and
builds the new tokenizer; `validate_trim` measures round trips, tokens per word, tokenization
agreement and bits per byte against the original. `vocab_trim` runs all three.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput
from orstack.vocab_trim.bpe import (
    ByteLevelBPE,
    MergeClosure,
    byte_alphabet,
    count_tokens,
    old_to_new_ids,
    parse_tokenizer_json,
    required_closure,
    select_tokens,
    trimmed_tokenizer_json,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
                   "decoder_start_token_id")
BLOCK_CHARS = 1 << 16  # corpus text is tokenized in blocks of whole lines of about this size
SAMPLE_CHARS = 1 << 20  # corpus text kept to check that tokenization is unchanged
MAX_ROUND_TRIP_LOSS = 0.0  # every line the original round-trips must still round-trip
MAX_TOKENS_PER_WORD_RISE = 0.05


@dataclass
class VocabTrimConfig:
    corpus: list[str]
    coverage: float | None = 0.995  # None when max_vocab is used
    max_vocab: int | None = None
    keep: str | None = None
    keep_merges: int = 0  # the results of the tokenizer's first N merges: its own most frequent tokens
    validate: str | None = None
    force: bool = False
    max_length: int = 512  # perplexity window (tokens)
    max_ppl_rise: float = 0.03  # the gate: the seed's rollback at +3% held-out perplexity (orstack/gates.py)

    def check(self) -> None:
        """The options alone make sense (BadInput naming the option otherwise)."""
        if self.coverage is not None and self.max_vocab is not None:
            raise BadInput("--coverage and --max-vocab are exclusive: give one")
        if self.coverage is None and self.max_vocab is None:
            raise BadInput("--coverage or --max-vocab: give one")
        if self.coverage is not None and not 0.0 < self.coverage <= 1.0:
            raise BadInput(f"--coverage: expected a share in (0, 1], got {self.coverage}")
        if self.max_vocab is not None and self.max_vocab < 1:
            raise BadInput(f"--max-vocab: expected at least 1, got {self.max_vocab}")
        if self.keep_merges < 0:
            raise BadInput(f"--keep-merges: expected 0 or more, got {self.keep_merges}")
        if self.max_length < 16:
            raise BadInput(f"--max-length: expected at least 16, got {self.max_length}")
        if not self.corpus:
            raise BadInput("--corpus: at least one file is required")
        from orstack.gates import check_limits

        check_limits(max_ppl_rise=self.max_ppl_rise)


@dataclass
class TrimPlan:
    bpe: ByteLevelBPE
    kept: list[int]  # old ids, ascending: new id i is old id kept[i]
    old_to_new: list[int | None]
    coverage: float  # share of the corpus' token occurrences the kept tokens cover
    corpus_tokens: int
    corpus_distinct: int
    sample: list[str] = field(default_factory=list)  # corpus text for the agreement check


# ---------------------------------------------------------------------------- corpus

def corpus_blocks(paths: Sequence[str | Path]) -> Iterator[str]:
    """Stream the corpus: JSONL rows (text, or prompt + response) or blocks of whole lines of
    plain text, so a large file is never read at once and newlines are tokenized in context."""
    from orstack.io.jsonl import open_text
    from orstack.io.text import read_texts

    for path in paths:
        if str(path).endswith(".jsonl"):
            yield from read_texts([path])
            continue
        with open_text(path) as f:
            block: list[str] = []
            size = 0
            try:
                for line in f:
                    block.append(line)
                    size += len(line)
                    if size >= BLOCK_CHARS:
                        yield "".join(block)
                        block, size = [], 0
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e) from None
            if block:
                yield "".join(block)


def _not_utf8(path: str | Path, e: UnicodeDecodeError) -> BadInput:
    """The error for invalid UTF-8 in a text file, naming the line (found by reading it again)."""
    from orstack.io.jsonl import STDIO, display_name, text_lines

    if str(path) != STDIO:
        try:
            for _ in text_lines(path):
                pass
        except BadInput as named:
            return named
    return BadInput(f"{display_name(path)}: not UTF-8 text ({e.reason})")


def check_corpus(paths: Sequence[str | Path]) -> None:
    """Read the corpus files once before any work, so that a malformed one (invalid UTF-8, a bad
    JSONL row) or a corpus without text is reported, naming the file and line, before the model
    loads. Standard input cannot be read twice: it is checked as it is counted."""
    files = [p for p in paths if str(p) != "-"]
    found = False
    for text in corpus_blocks(files):
        found = found or bool(text.strip())
    if files and len(files) == len(paths) and not found:
        raise BadInput(f"--corpus {', '.join(map(str, paths))}: no text")


def read_keep_file(path: str | Path) -> list[str]:
    from orstack.io.jsonl import text_lines

    return [line.rstrip("\r\n") for _, line in text_lines(path) if line.strip()]


# ---------------------------------------------------------------------------- planning

def backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The `tokenizers.Tokenizer` behind a fast tokenizer; slow tokenizers cannot be trimmed."""
    tk = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if tk is None:
        raise BadInput("tokenizer: vocab-trim needs a fast (tokenizer.json) byte-level BPE tokenizer")
    return tk


def special_ids(tokenizer: PreTrainedTokenizerBase, configs: Iterable[Any]) -> set[int]:
    """Ids that must survive: the tokenizer's special tokens and every id a config names."""
    ids = {i for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    for config in configs:
        for name in TOKEN_ID_FIELDS:
            value = getattr(config, name, None)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and v >= 0:
                    ids.add(v)
    return ids


def keep_ids(tk: Any, bpe: ByteLevelBPE, lines: Iterable[str]) -> set[int]:
    """--keep lines: a token as written in the vocabulary (e.g. `Ġdef`), else the tokens of the
    text alone and after a space (`def` keeps `def` and `Ġdef`)."""
    ids: set[int] = set()
    for line in lines:
        if line in bpe.vocab:
            ids.add(bpe.vocab[line])
            continue
        for text in (line, " " + line):
            ids.update(tk.encode(text, add_special_tokens=False).ids)
    return ids


def first_merges(bpe: ByteLevelBPE, count: int) -> set[int]:
    """The tokens the first `count` merges make. BPE learns merges most frequent pair first, so
    these are the tokens its training text used most: a floor of general text kept whatever
    the corpus holds, where text the corpus lacks must still read well."""
    return {bpe.vocab[a + b] for a, b in bpe.merges[:count] if a + b in bpe.vocab}


def plan_trim(tokenizer: PreTrainedTokenizerBase, configs: Iterable[Any], config: VocabTrimConfig) -> TrimPlan:
    """Count the corpus and choose the kept ids (specials, bytes, --keep, corpus; merge-closed)."""
    from orstack.console import progress

    tk = backend(tokenizer)
    bpe = parse_tokenizer_json(tk.to_str())
    required = {bpe.vocab[c] for c in byte_alphabet() if c in bpe.vocab}
    required |= set(bpe.added.values()) | special_ids(tokenizer, configs)
    if config.keep:
        required |= keep_ids(tk, bpe, read_keep_file(config.keep))
    required |= first_merges(bpe, config.keep_merges)
    closure = MergeClosure(bpe)
    required_closure(required, closure, config.max_vocab)  # an impossible --max-vocab, before counting
    counts: Counter = Counter()
    sample: list[str] = []
    sampled = 0
    with progress() as bar:
        task = bar.add_task("counting corpus tokens", total=None, unit="tokens")
        for text in corpus_blocks(config.corpus):
            for batch_counts in count_tokens(tk, [text]):
                counts.update(batch_counts)
                bar.advance(task, sum(batch_counts.values()))
            if sampled < SAMPLE_CHARS:
                sample.append(text)
                sampled += len(text)
    if not counts:
        raise BadInput(f"--corpus {', '.join(map(str, config.corpus))}: no text")
    kept, coverage = select_tokens(counts, required, closure, coverage=config.coverage, max_vocab=config.max_vocab)
    old_size = max(bpe.size, max(kept) + 1)
    return TrimPlan(bpe=bpe, kept=sorted(kept), old_to_new=old_to_new_ids(kept, old_size), coverage=coverage,
                    corpus_tokens=sum(counts.values()), corpus_distinct=len(counts), sample=sample)


# ---------------------------------------------------------------------------- applying

def remap_token_ids(config: Any, old_to_new: list[int | None]) -> None:
    for name in TOKEN_ID_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and 0 <= value < len(old_to_new):
            setattr(config, name, old_to_new[value])
        elif isinstance(value, (list, tuple)):
            setattr(config, name, [old_to_new[v] if isinstance(v, int) and 0 <= v < len(old_to_new) else v
                                   for v in value])


def slice_embeddings(model: PreTrainedModel, kept: list[int], old_to_new: list[int | None]) -> None:
    """Keep the embedding and output rows of the kept ids (a tied pair stays tied).

    The rows are cut inside the model's own modules, never by building a plain nn.Embedding:
    Gemma's embedding module multiplies by sqrt(hidden) in its forward (a buffer, not a weight),
    and that must survive in memory (the validation below runs this model) as well as on disk.
    Rows past the tokenizer (padded embeddings: Qwen2.5, Phi-3, Gemma 3) are never kept."""
    import torch

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if emb.weight.shape[0] <= kept[-1]:
        raise BadInput(f"model: embedding has {emb.weight.shape[0]} rows but the tokenizer uses id {kept[-1]}")
    tied = out is not None and out.weight.data_ptr() == emb.weight.data_ptr()
    index = torch.tensor(kept, device=emb.weight.device)
    old_pad = emb.padding_idx
    with torch.no_grad():
        emb.weight = torch.nn.Parameter(emb.weight.index_select(0, index), requires_grad=emb.weight.requires_grad)
        emb.num_embeddings = len(kept)
        emb.padding_idx = old_to_new[old_pad] if old_pad is not None and old_pad < len(old_to_new) else None
        if out is not None:
            out.weight = emb.weight if tied else torch.nn.Parameter(out.weight.index_select(0, index),
                                                                   requires_grad=out.weight.requires_grad)
            if out.bias is not None:
                out.bias = torch.nn.Parameter(out.bias.index_select(0, index), requires_grad=out.bias.requires_grad)
            out.out_features = len(kept)
    model.config.vocab_size = len(kept)
    remap_token_ids(model.config, old_to_new)
    if getattr(model, "generation_config", None) is not None:
        remap_token_ids(model.generation_config, old_to_new)


def build_tokenizer(tokenizer: PreTrainedTokenizerBase, tokenizer_json: str,
                    old_to_new: list[int | None]) -> PreTrainedTokenizerBase:
    """The original tokenizer (same class, options, chat template) around the trimmed tokenizer.json."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="orstack-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        for stale in ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"):
            Path(tmp, stale).unlink(missing_ok=True)
        Path(tmp, "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        config_path = Path(tmp, "tokenizer_config.json")
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if isinstance(config.get("added_tokens_decoder"), dict):
                config["added_tokens_decoder"] = {str(old_to_new[int(i)]): spec
                                                  for i, spec in config["added_tokens_decoder"].items()}
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


def count_parameters(model: PreTrainedModel) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    from orstack.layerwise import stream_of

    stream = stream_of(model)
    if stream is not None:
        import math

        return sum(math.prod(shape) for _, shape in stream.params.values())
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


# ---------------------------------------------------------------------------- validating

def agreement(old_tk: Any, new_tk: Any, old_to_new: list[int | None], texts: Sequence[str]) -> tuple[float, float]:
    """Share of lines the trimmed tokenizer splits exactly as the original (ids mapped): over all
    lines, and over the lines whose original tokens were all kept (1.0 by construction)."""
    lines = text_lines(texts)
    if not lines:
        return 1.0, 1.0
    same = same_kept = n_kept = 0
    old_all = old_tk.encode_batch(lines, add_special_tokens=False)
    new_all = new_tk.encode_batch(lines, add_special_tokens=False)
    for old, new in zip(old_all, new_all):
        mapped = [old_to_new[i] for i in old.ids]
        equal = mapped == new.ids
        same += equal
        if None not in mapped:
            n_kept += 1
            same_kept += equal
    return same / len(lines), (same_kept / n_kept if n_kept else 1.0)


def round_trips(tk: Any, lines: Sequence[str]) -> list[bool]:
    encoded = tk.encode_batch(list(lines), add_special_tokens=False)
    return [tk.decode(e.ids, skip_special_tokens=False) == line for e, line in zip(encoded, lines)]


def tokens_per_word(tk: Any, lines: Sequence[str]) -> float:
    words = sum(len(line.split()) for line in lines)
    tokens = sum(len(e.ids) for e in tk.encode_batch(list(lines), add_special_tokens=False))
    return tokens / max(words, 1)


def text_lines(texts: Iterable[str]) -> list[str]:
    return [line for text in texts for line in text.splitlines() if line.strip()]


def paragraphs(texts: Sequence[str]) -> list[str]:
    """The held-out texts cut at blank lines."""
    return [p for text in texts for p in re.split(r"\n\s*\n", text) if p.strip()]


def heldout_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 max_length: int):  # noqa: ANN201 - PerplexityResult
    """Perplexity scored paragraph by paragraph. Rolling windows over a whole document start
    wherever the token count says; when the trimmed tokenizer splits one word differently,
    every later window starts at another place in the text with another context, which moved
    SmolLM2's held-out perplexity by ~3% with no weight changed. Paragraphs start both models'
    windows at the same text."""
    from orstack.backends.perplexity import default_max_length, perplexity

    return perplexity(model, tokenizer, paragraphs(texts), max_length=min(max_length, default_max_length(model)))


@dataclass
class TrimResult:
    model: Any
    tokenizer: Any
    plan: TrimPlan
    metrics: dict[str, Any]
    checks: list[Any]  # orstack.gates.Check: the quality gate, decided by the stage


def vocab_trim(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: VocabTrimConfig,
               plan: TrimPlan | None = None, slicer: Any = None) -> TrimResult:
    """Trim `model` (in place) and its tokenizer to the corpus; validate on config.validate.

    `plan` (from `plan_trim`) may be made before the model is loaded, to fail fast on bad options.
    `slicer(model, plan)` -> trimmed model replaces the in-place slicing (a streamed model:
    orstack.vocab_trim.streamed)."""
    from tokenizers import Tokenizer

    from orstack.io.text import read_texts
    from orstack.layerwise import param_shape

    if plan is None:
        plan = plan_trim(tokenizer, [model.config, getattr(model, "generation_config", None)], config)
    heldout = list(read_texts([config.validate])) if config.validate else []
    loss_before = heldout_loss(model, tokenizer, heldout, config.max_length) if heldout else None
    params_before = count_parameters(model)
    vocab_before = param_shape(model, model.get_input_embeddings().weight)[0]
    tokenizer_json, n_merges = trimmed_tokenizer_json(plan.bpe, plan.old_to_new)
    old_tk, new_tk = backend(tokenizer), Tokenizer.from_str(tokenizer_json)
    new_tokenizer = build_tokenizer(tokenizer, tokenizer_json, plan.old_to_new)
    if slicer is None:
        slice_embeddings(model, plan.kept, plan.old_to_new)
    else:
        model = slicer(model, plan)
    metrics: dict[str, Any] = {
        "coverage": round(plan.coverage, 6), "corpus_tokens": plan.corpus_tokens,
        "corpus_distinct_tokens": plan.corpus_distinct,
        "vocab_before": vocab_before, "vocab_after": len(plan.kept),
        "merges_before": len(plan.bpe.merges), "merges_after": n_merges,
        "params_before": params_before, "params_after": count_parameters(model),
    }
    metrics["corpus_agreement"], metrics["corpus_agreement_kept"] = (
        round(r, 6) for r in agreement(old_tk, new_tk, plan.old_to_new, plan.sample))
    if metrics["corpus_agreement_kept"] < 1.0:  # the merge closure guarantees 1.0; anything else is a bug
        from orstack.console import warn

        warn(f"tokenization changed on {1 - metrics['corpus_agreement_kept']:.2%} of corpus lines "
             "whose tokens were all kept")
    checks: list[Any] = []
    if heldout:
        from orstack.gates import Gate, ppl_check, ppl_in_parent_tokens

        lines = text_lines(heldout)
        old_rt, new_rt = round_trips(old_tk, lines), round_trips(new_tk, lines)
        lost = sum(o and not n for o, n in zip(old_rt, new_rt))
        ascii_lines = [ok for ok, line in zip(new_rt, lines) if line.isascii()]
        tpw_before, tpw_after = tokens_per_word(old_tk, lines), tokens_per_word(new_tk, lines)
        loss_after = heldout_loss(model, new_tokenizer, heldout, config.max_length)
        ppl_before, ppl_after = ppl_in_parent_tokens(loss_before, loss_after)
        metrics.update({
            "heldout_lines": len(lines), "round_trip": round(sum(new_rt) / max(len(lines), 1), 6),
            "round_trip_ascii": round(sum(ascii_lines) / len(ascii_lines), 6) if ascii_lines else None,
            "heldout_agreement": round(agreement(old_tk, new_tk, plan.old_to_new, lines)[0], 6),
            "tokens_per_word_before": round(tpw_before, 4), "tokens_per_word_after": round(tpw_after, 4),
            "bits_per_byte_before": round(loss_before.bits_per_byte, 5),
            "bits_per_byte_after": round(loss_after.bits_per_byte, 5),
            "ppl_before": round(ppl_before, 5), "ppl_after": round(ppl_after, 5),
            "ppl_per": "parent token",
        })
        checks.append(ppl_check(ppl_before, ppl_after, config.max_ppl_rise, on=str(config.validate)))
        checks.append(Gate("held-out lines that no longer decode to themselves", len(lines) * MAX_ROUND_TRIP_LOSS,
                           "max", "round-trip rule").check(lost, on=str(config.validate)))
        checks.append(Gate("tokens per word rose", MAX_TOKENS_PER_WORD_RISE, "max", "tokens-per-word rule", "%")
                      .check(tpw_after / tpw_before - 1, before=tpw_before, after=tpw_after, on=str(config.validate)))
    return TrimResult(model=model, tokenizer=new_tokenizer, plan=plan, metrics=metrics, checks=checks)
