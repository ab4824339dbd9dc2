"""Perplexity and bits per byte of a causal LM on text.

Two scoring rules, so figures can be checked against either reference tool:
- "rolling": lm-evaluation-harness's `loglikelihood_rolling`: every token of each
  document is predicted exactly once, in windows of `max_length` tokens; the first
  window starts from a prefix token (BOS, or EOS when there is none) and later windows
  take their context from the preceding tokens.
- "llama.cpp": llama-perplexity's rule: the text (BOS first) is cut into chunks of
  `max_length` tokens, each chunk starts with BOS and only its second half is scored.
Bits per byte (total nats / ln 2 / UTF-8 bytes) compares models whose tokenizers differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

RULES = ("rolling", "llama.cpp")


@dataclass
class PerplexityResult:
    nll: float  # total negative log-likelihood, nats
    n_tokens: int  # tokens scored
    n_bytes: int  # UTF-8 bytes of the text those tokens cover
    rule: str = "rolling"

    @property
    def nll_per_token(self) -> float:
        return self.nll / max(self.n_tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.n_bytes, 1)

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "bits_per_byte": self.bits_per_byte, "nll_per_token": self.nll_per_token,
                "tokens": self.n_tokens, "bytes": self.n_bytes, "rule": self.rule}


@dataclass
class Window:
    input_ids: list[int]
    n_scored: int  # the last n_scored positions' next tokens are scored
    target_last: int  # the token after the last input position


def prefix_token(tokenizer) -> int:
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("tokenizer has neither BOS nor EOS to start a document")


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Window]:
    """lm-evaluation-harness's rolling windows with context_len=1: disjoint predictions."""
    windows = []
    first = min(max_length, len(tokens))
    if first == 0:
        return windows
    windows.append(Window([prefix] + tokens[: first - 1], first, tokens[first - 1]))
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_length)
        end = predicted + n_pred
        start = max(end - max_length - 1, 0)
        inputs = tokens[start : end - 1]
        windows.append(Window(inputs, n_pred, tokens[end - 1]))
        predicted = end
    return windows


def llama_cpp_windows(tokens: list[int], bos: int, n_ctx: int) -> list[Window]:
    """llama-perplexity's chunks: BOS first, only the second half of each chunk scored."""
    windows = []
    first = n_ctx // 2
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = [bos] + tokens[start + 1 : start + n_ctx]
        n_scored = n_ctx - 1 - first
        # positions first .. n_ctx-2 predict chunk[first+1 .. n_ctx-1]; the input is the chunk
        # without its last token, and its last token is the final target.
        windows.append(Window(chunk[:-1], n_scored, chunk[-1]))
    return windows


def _scored_targets(window: Window) -> list[int]:
    full = window.input_ids + [window.target_last]
    return full[len(full) - window.n_scored :]


def window_batches(windows: list[Window], batch_size: int = 8, pad_id: int = 0, device="cpu",  # noqa: ANN001
                   ) -> tuple[list[list[Window]], list[dict]]:
    """The windows in batches, and each batch as the model's keyword arguments (input_ids right-padded
    with `pad_id`, attention_mask)."""
    import torch

    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    inputs = []
    for batch in batches:
        width = max(len(w.input_ids) for w in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            ids[row, : len(w.input_ids)] = torch.tensor(w.input_ids)
            mask[row, : len(w.input_ids)] = 1
        inputs.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return batches, inputs


def score_logits(batches: list[list[Window]], logits: Iterable, description: str = "ppl") -> float:
    """Total NLL (nats) of the scored targets, given each batch's logits in turn."""
    import torch

    from orstack.console import track

    total = 0.0
    with torch.no_grad():
        for batch, batch_logits in track(zip(batches, logits), description, total=len(batches), unit="batches"):
            logprobs = torch.log_softmax(batch_logits.float(), dim=-1)
            for row, w in enumerate(batch):
                n_in = len(w.input_ids)
                positions = torch.arange(n_in - w.n_scored, n_in)
                targets = torch.tensor(_scored_targets(w))
                total -= logprobs[row, positions, targets].sum().item()
    return total


def score_windows(
    model, windows: list[Window], batch_size: int = 8, pad_id: int = 0, description: str = "ppl"
) -> float:
    """Total NLL (nats) of the scored targets of every window."""
    batches, inputs = window_batches(windows, batch_size, pad_id, next(model.parameters()).device)
    stream = getattr(model, "_orstack_stream", None)  # orstack.layerwise.StreamedModel (a higher layer)
    if stream is not None:  # a model read from disk: each layer once for all batches, not once per batch
        logits = stream.batch_logits(model, inputs)
    else:
        logits = (model(**batch).logits for batch in inputs)
    return score_logits(batches, logits, description)


def default_max_length(model, limit: int = 2048) -> int:
    return min(getattr(model.config, "max_position_embeddings", limit) or limit, limit)


def perplexity(
    model,
    tokenizer,
    texts: Iterable[str] | str,
    *,
    max_length: int | None = None,
    rule: str = "rolling",
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of `model` on `texts` (one document per item) under `rule`."""
    windows, n_bytes = text_windows(tokenizer, texts, max_length or default_max_length(model), rule)
    nll = score_windows(model, windows, batch_size, pad_id_of(tokenizer))
    return PerplexityResult(nll, sum(w.n_scored for w in windows), n_bytes, rule)


def pad_id_of(tokenizer) -> int:  # noqa: ANN001
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def text_windows(tokenizer, texts: Iterable[str] | str, max_length: int, rule: str = "rolling",  # noqa: ANN001
                 ) -> tuple[list[Window], int]:
    """The windows `texts` are scored in under `rule`, and the UTF-8 bytes they cover."""
    return windows_of(texts, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                      tokenizer.decode, prefix_token(tokenizer), max_length, rule)


def windows_of(texts: Iterable[str] | str, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
               prefix: int, max_length: int, rule: str = "rolling") -> tuple[list[Window], int]:
    """`text_windows` for any engine's tokenizer: its `encode` (no special tokens), `decode` and
    prefix token. The bytes of the llama.cpp rule are the scored targets decoded as transformers
    does (an incomplete UTF-8 sequence counts as U+FFFD)."""
    if rule not in RULES:
        raise ValueError(f"unknown perplexity rule '{rule}' (use {' or '.join(RULES)})")
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t]
    if rule == "rolling":
        windows, n_bytes = [], 0
        for text in texts:
            windows.extend(rolling_windows(encode(text), prefix, max_length))
            n_bytes += len(text.encode("utf-8"))
    else:
        windows = llama_cpp_windows([prefix] + encode("\n\n".join(texts)), prefix, max_length)
        n_bytes = sum(len(decode(_scored_targets(w)).encode("utf-8")) for w in windows)
    if not windows:
        raise ValueError(f"text too short to score under the {rule} rule with max length {max_length}")
    return windows, n_bytes
