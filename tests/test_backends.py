"""The Backend protocol on both runtimes: sampling, logits, greedy tokens, in-memory models."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from orstack.backends.base import Sampling, open_backend  # noqa: E402
from orstack.runtime import Runtime  # noqa: E402

PROMPTS = ["12+345=", "rev abc="]


@pytest.fixture(scope="module")
def hf(random_llama):
    backend = open_backend(str(random_llama), Runtime(device="cpu"), batch_size=4)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def gguf_f32(random_llama, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from orstack.gguf import GgufConfig, run

    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    run(str(random_llama), out, GgufConfig(type="f32", validate=False), Runtime(device="cpu"))
    return out


@pytest.fixture(scope="module")
def ll(gguf_f32):
    backend = open_backend(str(gguf_f32), Runtime(device="cpu"))
    yield backend
    backend.close()


def _texts(draws):
    return [[g.text for g in d] for d in draws]


@pytest.mark.parametrize("which", ["hf", "ll"])
def test_sampling_is_seeded_and_draws_n(which, request):
    backend = request.getfixturevalue(which)
    sampling = Sampling(temperature=1.0, n=3, seed=7)
    first = backend.sample(PROMPTS, max_new_tokens=6, stop=[], sampling=sampling)
    again = backend.sample(PROMPTS, max_new_tokens=6, stop=[], sampling=sampling)
    other = backend.sample(PROMPTS, max_new_tokens=6, stop=[], sampling=Sampling(temperature=1.0, n=3, seed=8))
    assert [len(d) for d in first] == [3, 3]
    assert _texts(first) == _texts(again)
    assert _texts(first) != _texts(other)  # a random model at T=1 over ~300 tokens: draws differ
    assert all(1 <= g.output_tokens <= 6 for d in first for g in d)


@pytest.mark.parametrize("which", ["hf", "ll"])
def test_top_k_one_sampling_is_greedy(which, request):
    backend = request.getfixturevalue(which)
    greedy = backend.generate(PROMPTS, max_new_tokens=6, stop=[])
    sampled = backend.sample(PROMPTS, max_new_tokens=6, stop=[], sampling=Sampling(top_k=1, n=2, seed=1))
    assert [[g.text] * 2 for g in greedy] == _texts(sampled)


def test_sampled_text_is_cut_at_stop_sequences(ll):
    draws = ll.sample(PROMPTS, max_new_tokens=12, stop=["a", "1", "e"], sampling=Sampling(n=4, seed=3))
    assert all(not any(s in g.text for s in ("a", "1", "e")) for d in draws for g in d)


def test_logits_and_greedy_tokens_agree_across_runtimes(hf, ll):
    ids = hf.encode_prompt(PROMPTS[0])
    assert ids == ll.encode_prompt(PROMPTS[0])
    a, b = hf.logits(ids), ll.logits(ids)
    assert a.shape == b.shape
    assert abs(a - b).max() < 1e-3
    assert hf.greedy_tokens(ids, 8) == ll.greedy_tokens(ids, 8)


def test_both_runtimes_tell_the_context_length(hf, ll):
    assert hf.context_length() == ll.context_length() == 256  # max_position_embeddings of random_llama


def test_the_llama_cpp_backend_answers_tasks_through_the_protocol(hf, ll):
    from orstack.tasks.results import run_tasks

    tasks = [{"id": "a", "prompt": PROMPTS[0], "kind": "numeric", "answer": "357"},
             {"id": "c", "prompt": "cmp 17 9=", "kind": "choice", "choices": [">", "<"], "answer": 0}]
    rows = {b.name: run_tasks(b, tasks, max_new_tokens=5) for b in (hf, ll)}
    assert [r["output"] for r in rows[hf.name]] == [r["output"] for r in rows[ll.name]]
    assert rows[ll.name][1]["choice_loglikelihoods"] == pytest.approx(rows[hf.name][1]["choice_loglikelihoods"],
                                                                      abs=1e-3)


def test_in_memory_backend_answers_like_a_loaded_one(hf):
    from orstack.backends.hf import HFBackend

    memory = HFBackend.from_model(hf.model, hf.tokenizer, batch_size=2)
    assert [g.text for g in memory.generate(PROMPTS, max_new_tokens=5, stop=["\n"])] == \
        [g.text for g in hf.generate(PROMPTS, max_new_tokens=5, stop=["\n"])]
