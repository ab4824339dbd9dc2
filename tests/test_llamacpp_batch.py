"""llama.cpp backend, several sequences decoded at once: the same greedy outputs as one prompt
at a time (F32 weights; quantized kernels round batched matmuls differently, see the backend)."""

from __future__ import annotations

import pytest

PROMPTS = ["12+345=", "rev abc=", "1", "sort 3 1 2=", "the quick brown fox jumps over", "9*9=", "a", "7-2=",
           "12+346=", "12+347=", "sort 3 1 4="]  # some batches share a prefix


@pytest.fixture(scope="module")
def gguf_f32(random_llama_gguf):
    return random_llama_gguf("f32")


@pytest.mark.slow  # a GGUF export and three backends (~30 s); the path bench does not take by default
@pytest.mark.parametrize("stop", [[], ["a"]])
def test_batched_generation_equals_one_prompt_at_a_time(gguf_f32, stop):
    from orstack.backends.llamacpp import LlamaCppBackend

    one = LlamaCppBackend(str(gguf_f32), n_threads=1)
    many = LlamaCppBackend(str(gguf_f32), n_threads=1, batch_size=3)
    try:
        ours = one.generate(PROMPTS, max_new_tokens=8, stop=stop)
        batched = many.generate(PROMPTS, max_new_tokens=8, stop=stop)
        again = many.generate(PROMPTS[::-1], max_new_tokens=8, stop=stop)[::-1]  # other neighbours
    finally:
        one.close()
        many.close()
    for o, b, a in zip(ours, batched, again):
        assert (b.text, b.output_tokens, b.prompt_tokens) == (o.text, o.output_tokens, o.prompt_tokens)
        assert a.text == o.text
        assert b.token_logprobs == pytest.approx(o.token_logprobs, abs=1e-4)
        assert b.token_entropies == pytest.approx(o.token_entropies, abs=1e-4)
    if stop:
        assert any(g.output_tokens < 8 for g in batched)  # some rows stopped early and left the batch


@pytest.fixture(scope="module")
def gguf_q8(random_llama_gguf):
    return random_llama_gguf("q8_0")


def test_prefix_reuse_equals_a_fresh_cache(gguf_q8):
    """One prompt at a time keeps the KV cache of what the last prompt shared with the next; on
    quantized weights its tokens and log-probabilities are those of a fresh context's eval."""
    import numpy as np

    from orstack.backends.llamacpp import LlamaCppBackend, _log_softmax

    prompts = ["12+345=", "12+346=", "12+3", "12+345=", "rev abc=", "1", "12+345=9"]
    backend = LlamaCppBackend(str(gguf_q8), n_threads=1)
    try:
        ours = backend.generate(prompts, max_new_tokens=6, stop=[])
        for prompt, gen in zip(prompts, ours):
            ids = backend.encode_prompt(prompt)
            fresh = backend.greedy_tokens(ids, gen.output_tokens)  # the main context, reset and evaluated anew
            assert backend.decode(fresh) == gen.text
            scores = backend.logits(ids + fresh[:-1])[len(ids) - 1:]
            chosen = [float(_log_softmax(row)[tok]) for row, tok in zip(scores, fresh)]
            assert np.allclose(chosen, gen.token_logprobs, atol=1e-5)
        assert backend._single.tokens[:4] == backend.encode_prompt("12+345=9")[:4]  # the cache was kept
    finally:
        backend.close()
