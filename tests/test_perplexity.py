"""Perplexity: agrees with a direct transformers loss, and both scoring rules behave."""

from __future__ import annotations

import math

import pytest
import torch

from orstack.backends.perplexity import llama_cpp_windows, perplexity, rolling_windows
from orstack.io.checkpoint import load_model

TEXT = "The quick brown fox jumps over the lazy dog. 12+345=357 and rev abc=cba.\n" * 3


def direct_loss(model, tokenizer, text: str) -> float:
    """Mean NLL per token with the BOS prefix, computed by transformers itself."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def test_single_window_matches_transformers_loss(random_llama):
    model, tokenizer = load_model(random_llama)
    result = perplexity(model, tokenizer, TEXT, max_length=256)
    expected = direct_loss(model, tokenizer, TEXT)
    assert result.nll_per_token == pytest.approx(expected, rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-4)
    assert result.n_bytes == len(TEXT.encode())
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / result.n_bytes)


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 137))
    for max_length in (1, 5, 16, 37, 64):
        windows = rolling_windows(tokens, prefix=1, max_length=max_length)
        predicted = []
        for w in windows:
            assert len(w.input_ids) <= max_length
            full = w.input_ids + [w.target_last]
            predicted.extend(full[len(full) - w.n_scored:])
        assert predicted == tokens


def test_rolling_batches_and_windows_do_not_change_the_total(random_llama):
    model, tokenizer = load_model(random_llama)
    whole = perplexity(model, tokenizer, TEXT, max_length=256, batch_size=1)
    split = perplexity(model, tokenizer, TEXT, max_length=256, batch_size=4)
    assert split.nll == pytest.approx(whole.nll, rel=1e-5)
    windowed = perplexity(model, tokenizer, TEXT, max_length=16, batch_size=3)
    assert windowed.n_tokens == whole.n_tokens
    assert windowed.nll != pytest.approx(whole.nll, rel=1e-6)  # less context, different score


def test_llama_cpp_rule_scores_second_half_of_chunks():
    tokens = [1] + list(range(10, 50))
    windows = llama_cpp_windows(tokens, bos=1, n_ctx=8)
    assert len(windows) == len(tokens) // 8
    assert all(w.input_ids[0] == 1 and len(w.input_ids) == 7 and w.n_scored == 3 for w in windows)


def test_llama_cpp_rule_runs(random_llama):
    model, tokenizer = load_model(random_llama)
    result = perplexity(model, tokenizer, TEXT * 4, max_length=32, rule="llama.cpp")
    assert result.n_tokens > 0 and result.n_bytes > 0 and math.isfinite(result.ppl)
