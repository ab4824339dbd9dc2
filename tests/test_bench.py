"""The transformers backend and the runner: batching invariance, stopping, Result rows, accuracy."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from orstack.backends.base import Generation, open_backend  # noqa: E402
from orstack.errors import BadInput  # noqa: E402
from orstack.runtime import Runtime  # noqa: E402
from orstack.tasks.contract import RESULT_FIELDS, RESULT_ORDER, load_tasks  # noqa: E402
from orstack.tasks.results import accuracy_summary, fit_prompts, result_row, run_tasks  # noqa: E402


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
    checked = 0
    for prompt, g in zip(prompts, free):
        if len(g.text) < 4:  # too short to hold a stop sequence past its start
            continue
        stop = g.text[2:4]
        cut = backend.generate([prompt], max_new_tokens=8, stop=[stop, "never-generated-zzz"])[0]
        assert cut.text == g.text[: g.text.find(stop)]
        assert cut.output_tokens <= g.output_tokens
        assert cut.token_logprobs == pytest.approx(g.token_logprobs[: cut.output_tokens], abs=1e-5)
        checked += 1
    assert checked >= 4


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
        assert list(row)[: len(RESULT_ORDER)] == list(RESULT_ORDER)
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


def test_result_rows_take_their_fields_from_the_contract():
    # a Result row used as a task: its old answer's fields are not the new answer's
    old = {"id": "x", "prompt": "p", "kind": "exact", "answer": "a", "family": "f", "model": "old", "output": "b",
           "correct": False, "choice_loglikelihoods": [-1.0, -2.0], "route": "accurate"}
    row = result_row(old, "new", "a", None)
    assert list(row)[: len(RESULT_ORDER)] == list(RESULT_ORDER)
    assert row["model"] == "new" and row["output"] == "a" and row["correct"] is None and row["family"] == "f"
    assert "choice_loglikelihoods" not in row and "route" not in row
    task_fields = {"id", "prompt", "answer", "kind", "domain"}
    assert set(RESULT_ORDER) - task_fields <= set(RESULT_FIELDS)


def test_prompts_longer_than_the_context_are_refused_or_keep_their_end(backend):
    assert backend.context_length() == 256
    short = {"id": "s", "prompt": "12+345=", "kind": "numeric", "answer": "357"}
    long = {"id": "l", "prompt": "rev abc=cba sort dcba=abcd " * 30, "kind": "text"}
    assert len(backend.encode_prompt(long["prompt"])) > 256
    with pytest.raises(BadInput, match=r"^t.jsonl: task 'l': field 'prompt': the prompt has \d+ tokens, more than the "
                                       r"context of .* \(256 tokens\); shorten it or pass --truncate-prompts$"):
        fit_prompts(backend, [short, long], max_new_tokens=10, source="t.jsonl")
    from orstack.tasks.contract import TaskList

    with pytest.raises(BadInput, match=r"^t.jsonl:7: field 'prompt': the prompt has \d+ tokens"):
        fit_prompts(backend, TaskList([short, long], "t.jsonl", {"s": 6, "l": 7}), max_new_tokens=10)
    fitted, truncated = fit_prompts(backend, [short, long], max_new_tokens=10, truncate=True)
    assert truncated == 1 and fitted[0] is short
    kept = fitted[1]["prompt"]
    assert long["prompt"].endswith(kept)
    assert len(backend.encode_prompt(kept)) <= 256 - 10  # room for the answer
    assert len(backend.encode_prompt(long["prompt"][-len(kept) - 1 :])) > 256 - 10  # the longest end that fits
    # a choice task leaves room for its longest choice
    choice = {"id": "c", "prompt": long["prompt"], "kind": "choice", "choices": ["a", "b"], "answer": 0}
    fitted, _ = fit_prompts(backend, [choice], max_new_tokens=100, truncate=True)
    assert 256 - 4 <= len(backend.encode_prompt(fitted[0]["prompt"])) <= 256 - 2


def test_a_huge_prompt_is_judged_from_its_beginning(backend):
    import time

    huge = {"id": "h", "prompt": "rev abc=cba " * 1_000_000, "kind": "text"}  # 12 MB
    began = time.perf_counter()
    with pytest.raises(BadInput, match=r"task 'h': field 'prompt': the prompt's first \d+ of 12000000 characters "
                                       r"alone are"):
        fit_prompts(backend, [huge], max_new_tokens=10)
    fitted, truncated = fit_prompts(backend, [huge], max_new_tokens=10, truncate=True)
    assert truncated == 1 and huge["prompt"].endswith(fitted[0]["prompt"])
    assert time.perf_counter() - began < 10  # a full tokenization alone takes longer


def test_lineage_of_a_gguf_file_comes_from_its_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    import json

    import numpy as np

    from orstack.bench.report import lineage

    manifest = {"stage": "gguf", "args": {"type": "f32"},
                "lineage": [{"stage": "tiny", "path": "tiny", "args": {}},
                            {"stage": "prune", "path": "pruned", "args": {"sparsity": 0.5}}]}
    paths = {}
    for name, meta in (("with", manifest), ("without", None)):
        paths[name] = tmp_path / f"{name}.gguf"
        writer = gguf.GGUFWriter(str(paths[name]), "llama")
        if meta is not None:
            writer.add_string("orstack.manifest", json.dumps(meta))
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    steps = lineage(str(paths["with"]))
    assert [s["stage"] for s in steps] == ["tiny", "prune", "gguf"]
    assert steps[1]["args"] == {"sparsity": 0.5} and steps[2]["path"] == str(paths["with"])
    assert lineage(str(paths["without"])) == []


def test_lineage_of_a_pack_comes_from_the_packed_manifest(random_llama, tmp_path):
    import json
    import shutil

    from orstack.bench.report import lineage
    from orstack.io.manifest import MANIFEST
    from orstack.zstd_pack import PackConfig, pack

    model = tmp_path / "model"
    shutil.copytree(random_llama, model)
    (model / MANIFEST).write_text(json.dumps({"stage": "vocab-trim", "args": {"keep": 200}, "lineage": [
        {"stage": "tiny", "path": "tiny", "args": {}}]}))
    pack(model, tmp_path / "model.orz", PackConfig(level=5))
    steps = lineage(str(tmp_path / "model.orz"))
    assert [s["stage"] for s in steps] == ["tiny", "vocab-trim", "zstd-pack"]
    assert steps[1]["args"] == {"keep": 200} and steps[2]["args"]["level"] == 5
    assert steps[2]["path"] == str(tmp_path / "model.orz")
    pack(random_llama, tmp_path / "bare.orz")  # no orstack.json inside: only the packing is known
    assert [s["stage"] for s in lineage(str(tmp_path / "bare.orz"))] == ["zstd-pack"]


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
