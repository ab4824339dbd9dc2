"""The transformers backend and the runner: batching invariance, stopping, Result rows, accuracy."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from orstack.backends.base import Generation, open_backend  # noqa: E402
from orstack.errors import BadInput  # noqa: E402
from orstack.runtime import Runtime  # noqa: E402
from orstack.tasks.contract import RESULT_ORDER as RESULT_FIELDS  # noqa: E402
from orstack.tasks.contract import load_tasks  # noqa: E402
from orstack.tasks.results import accuracy_summary, run_tasks  # noqa: E402


@pytest.fixture(scope="module")
def backend(random_llama):
    torch.set_num_threads(1)
    b = open_backend(str(random_llama), Runtime(device="cpu"), batch_size=16)
    yield b
    b.close()


def _random_texts(n: int, seed: int, alphabet: str = "abc xyz12+=\n", longest: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, longest))) for _ in range(n)]


def test_loglikelihoods_do_not_depend_on_batch_size(backend):
    contexts = _random_texts(24, 0)
    continuations = [" " + c for c in _random_texts(24, 1, "abc 123", 12)]
    backend.batch_size = 1
    one = backend.loglikelihoods(contexts, continuations)
    backend.batch_size = 16
    sixteen = backend.loglikelihoods(contexts, continuations)
    assert max(abs(a - b) for a, b in zip(one, sixteen)) < 1e-5
    assert all(s < 0 for s in one)


def test_loglikelihood_matches_a_direct_forward_pass(backend):
    context, continuation = "rev abc=", " cba"
    ctx = backend.encode(context)
    cont = backend.encode(context + continuation)[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(ids).logits[0].double(), -1)
    direct = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    # the backend moves the trailing context space onto the continuation, as lm-eval does
    assert backend.loglikelihoods([context], [continuation])[0] == pytest.approx(direct, abs=1e-5)


def test_generation_does_not_depend_on_batch_size(backend):
    prompts = _random_texts(20, 2)
    backend.batch_size = 1
    one = backend.generate(prompts, max_new_tokens=6, stop=[])
    backend.batch_size = 16
    sixteen = backend.generate(prompts, max_new_tokens=6, stop=[])
    for a, b in zip(one, sixteen):
        assert a.text == b.text and a.output_tokens == b.output_tokens and a.prompt_tokens == b.prompt_tokens
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-5
        assert max(abs(x - y) for x, y in zip(a.token_entropies, b.token_entropies)) < 1e-5


def test_greedy_generation_matches_transformers_generate(backend):
    prompt = "12+345="
    ids = torch.tensor([backend.encode_prompt(prompt)])
    with torch.no_grad():
        ref = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, pad_token_id=backend.pad_id)
    ref_tokens = ref[0, ids.shape[1]:].tolist()
    gen = backend.generate([prompt], max_new_tokens=8, stop=[])[0]
    assert gen.output_tokens == 8
    assert gen.text == backend.tokenizer.decode(ref_tokens, skip_special_tokens=True)
    # logprob and entropy of each step, from the reference forward pass
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(ref).logits[0].float(), -1)
    for j, tok in enumerate(ref_tokens):
        step = logp[ids.shape[1] - 1 + j]
        assert gen.token_logprobs[j] == pytest.approx(step[tok].item(), abs=1e-4)
        assert gen.token_entropies[j] == pytest.approx(-(step.exp() * step).sum().item(), abs=1e-4)


def test_stop_sequences_cut_the_text(backend):
    prompts = _random_texts(8, 3)
    free = backend.generate(prompts, max_new_tokens=8, stop=[])
    for prompt, g in zip(prompts, free):
        if len(g.text) < 4:
            continue
        stop = g.text[2:4]
        cut = backend.generate([prompt], max_new_tokens=8, stop=[stop, "never-generated-zzz"])[0]
        assert cut.text == g.text[: g.text.find(stop)]
        assert cut.output_tokens <= g.output_tokens
        assert cut.token_logprobs == pytest.approx(g.token_logprobs[: cut.output_tokens], abs=1e-5)


def test_eos_stops_generation(backend):
    first = backend.generate(["abc"], max_new_tokens=4, stop=[])[0]
    token = backend.encode_prompt("abc")  # find the first generated token id
    with torch.no_grad():
        first_id = backend.model(torch.tensor([token])).logits[0, -1].argmax().item()
    saved = backend.eos_ids
    backend.eos_ids = {first_id}
    try:
        stopped = backend.generate(["abc"], max_new_tokens=4, stop=[])[0]
    finally:
        backend.eos_ids = saved
    assert first.output_tokens == 4
    assert stopped.output_tokens == 1 and stopped.text == ""


def test_result_rows_follow_the_contract(backend, tmp_path):
    tasks = [
        {"id": "a1", "prompt": "12+345=", "answer": "357", "kind": "numeric", "family": "add", "level": 2},
        {"id": "r1", "prompt": "rev abc=", "answer": "cba", "kind": "exact", "family": "reverse", "domain": "str"},
        {"id": "c1", "prompt": "cmp 17 9=", "choices": [">", "<"], "answer": ">", "kind": "choice"},
        {"id": "t1", "prompt": "Say", "kind": "text"},
    ]
    rows = run_tasks(backend, tasks, max_new_tokens=5, batch_size=4)
    assert [r["id"] for r in rows] == ["a1", "r1", "c1", "t1"]
    for row in rows:
        assert list(row)[: len(RESULT_FIELDS)] == list(RESULT_FIELDS)
        assert row["model"] == backend.name
    gen = rows[0]
    assert gen["family"] == "add" and gen["level"] == 2  # unknown fields pass through
    assert gen["correct"] in (True, False) and gen["score"] in (0.0, 1.0)
    assert 1 <= gen["output_tokens"] <= 5 and gen["prompt_tokens"] == len(backend.encode_prompt("12+345="))
    assert gen["min_logprob"] <= gen["mean_logprob"] < 0 and gen["mean_entropy"] > 0 and gen["latency_ms"] > 0
    assert rows[1]["domain"] == "str"
    choice = rows[2]
    expected = backend.loglikelihoods(["cmp 17 9="] * 2, [" >", " <"])
    assert choice["choice_loglikelihoods"] == pytest.approx(expected, abs=1e-6)
    assert choice["output"] == [">", "<"][expected.index(max(expected))]
    assert choice["correct"] == (choice["output"] == ">")
    assert rows[3]["correct"] is None and rows[3]["score"] is None
    summary = accuracy_summary(rows)
    assert summary["scored"] == 3 and summary["tasks"] == 4


def test_load_tasks_reports_file_and_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "kind": "exact", "answer": "x"}\n{"id": "b", "prompt": "p"\n')
    with pytest.raises(BadInput, match=r"tasks.jsonl:2: not valid JSON"):
        load_tasks(path)
    path.write_text('{"id": "a", "prompt": "p", "kind": "exact", "answer": "x"}\n\n{"id": "b", "kind": "exact"}\n')
    with pytest.raises(BadInput, match=r"tasks.jsonl:3: missing required field 'prompt'"):
        load_tasks(path)
    path.write_text("".join(f'{{"id": "{i}", "prompt": "p", "kind": "exact", "answer": "x"}}\n' for i in range(9)))
    assert len(load_tasks(path, limit=4)) == 4


def test_gguf_without_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such GGUF file"):
        open_backend(str(tmp_path / "missing.gguf"), Runtime())


def test_generation_dataclass_defaults():
    g = Generation(text="x", prompt_tokens=1, output_tokens=1)
    assert g.token_logprobs == [] and g.latency_ms == 0.0


def test_tiny_trained_accuracy_is_non_trivial_and_clusters(tiny_trained):
    torch.set_num_threads(1)
    tasks = load_tasks(tiny_trained.tasks / "heldout.jsonl")
    backend = open_backend(str(tiny_trained.model), Runtime(device="cpu"), batch_size=64)
    try:
        rows = run_tasks(backend, tasks, max_new_tokens=16, batch_size=64)
    finally:
        backend.close()
    summary = accuracy_summary(rows)
    assert 0.15 <= summary["accuracy"] <= 0.9
    by_level = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r["correct"])
    easy, hard = min(by_level), max(by_level)
    assert sum(by_level[easy]) / len(by_level[easy]) > sum(by_level[hard]) / len(by_level[hard]) + 0.2
    # confident answers are right more often than unconfident ones (what the router relies on)
    ranked = sorted((r for r in rows if r["mean_logprob"] is not None), key=lambda r: r["mean_logprob"])
    half = len(ranked) // 2
    low, high = ranked[:half], ranked[half:]
    assert sum(r["correct"] for r in high) / len(high) > sum(r["correct"] for r in low) / len(low)
