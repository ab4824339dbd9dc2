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
def gguf_f32(random_llama_gguf):
    return random_llama_gguf("f32")


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


# -- vLLM: only where it is installed and a GPU is present; elsewhere a clear exit 2 ---------------
def _vllm_runs() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(_vllm_runs(), reason="vLLM and a GPU are here: the refusal cannot happen")
def test_vllm_is_refused_with_the_reason_where_it_cannot_run(random_llama, tmp_path, monkeypatch):
    import importlib.util
    import subprocess
    import sys

    from orstack.backends.vllm import check_vllm_available
    from orstack.errors import BadInput
    from orstack.teachers.base import open_teacher

    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"id": "a", "prompt": "1+1=", "kind": "numeric", "answer": "2"}\n')
    out = tmp_path / "rows.jsonl"
    missing = importlib.util.find_spec("vllm") is None
    reason = "vllm is not installed" if missing else "no GPU"
    done = subprocess.run([sys.executable, "-m", "orstack", "bench", f"vllm:{random_llama}", "--tasks", str(tasks),
                           "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 2 and reason in done.stderr and not out.exists()
    with pytest.raises(BadInput, match=reason):
        open_teacher(f"vllm:{random_llama}", Runtime(device="cpu")).check()
    if missing and not torch.cuda.is_available():  # the GPU check as well, with vLLM pretended present
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "vllm" else real(name, *a))
        with pytest.raises(BadInput, match="--vllm: no GPU"):
            check_vllm_available("--vllm")


@pytest.mark.skipif(_vllm_runs(), reason="vLLM and a GPU are here: the refusal cannot happen")
def test_rl_vllm_is_refused_before_anything_loads(random_llama, tmp_path):
    import subprocess
    import sys

    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"id": "a", "prompt": "1+1=", "kind": "numeric", "answer": "2"}\n')
    done = subprocess.run([sys.executable, "-m", "orstack", "rl", str(random_llama), "--tasks", str(tasks), "--vllm",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 2 and "--vllm: " in done.stderr and not (tmp_path / "out").exists()
    assert "vllm is not installed" in done.stderr or "no GPU" in done.stderr


@pytest.mark.skipif(not _vllm_runs(), reason="needs vLLM and a CUDA GPU")
def test_vllm_greedy_equals_the_transformers_backend(random_llama):
    from orstack.backends.vllm import VLLMBackend

    backend = VLLMBackend(f"vllm:{random_llama}", dtype="float32")
    try:
        ours = backend.generate(PROMPTS, max_new_tokens=6, stop=[])
    finally:
        backend.close()
    hf = open_backend(str(random_llama), Runtime(device="cuda"))
    try:
        ref = hf.generate(PROMPTS, max_new_tokens=6, stop=[])
    finally:
        hf.close()
    assert [g.text for g in ours] == [g.text for g in ref]
    assert all(len(g.token_logprobs) == g.output_tokens for g in ours)


def test_a_shared_prefix_computed_once_changes_no_output(hf):
    import random

    rng = random.Random(3)
    head = "Answer each question with one number, then stop. Question: "
    prompts = [head + "".join(rng.choice("0123456789+= ") for _ in range(rng.randint(1, 12))) for _ in range(12)]
    prompts.append("no shared head at all")
    runs = {}
    for share, batch in ((False, 1), (True, 1), (True, 4), (False, 4)):
        hf.share_prefix, hf.batch_size, hf._prefix_ids = share, batch, None
        runs[share, batch] = hf.generate(prompts, max_new_tokens=6, stop=[])
    assert hf._prefix_ids is not None and len(hf._prefix_ids) >= 8  # the cache was in use
    ref = runs[False, 1]
    for key, gens in runs.items():
        for a, b in zip(ref, gens):
            assert (a.text, a.output_tokens, a.prompt_tokens) == (b.text, b.output_tokens, b.prompt_tokens), key
            assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-4, key
    hf.share_prefix, hf.batch_size = True, 4
