"""`bench --ppl-answers`: perplexity of each task's answer tokens given its prompt."""

from __future__ import annotations

import json
import math

from conftest import run_orstack

TASKS = [
    {"id": "a1", "prompt": "12+345=", "answer": "357", "kind": "numeric", "family": "add", "level": 1},
    {"id": "r1", "prompt": "rev abc=", "answer": "cba", "kind": "exact", "family": "reverse", "level": 1},
    {"id": "c1", "prompt": "cmp 17 9=", "choices": [">", "<"], "answer": 0, "kind": "choice", "family": "compare"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def reference_answer_ppl(model_dir, pairs) -> tuple[float, int]:
    """The same figure straight from transformers: BOS + prompt + answer, log-softmax, the
    answer positions summed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, n = 0.0, 0
    for prompt, answer in pairs:
        ctx = tok(prompt)["input_ids"]
        cont = tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        nll -= float(logp[torch.arange(len(targets)), targets][-len(cont):].sum())
        n += len(cont)
    return math.exp(nll / n), n


def test_ppl_answers_matches_transformers(tiny_untrained, tmp_path):
    tasks = write_jsonl(tmp_path / "t.jsonl", TASKS)
    summary = tmp_path / "s.json"
    result = run_orstack("bench", str(tiny_untrained.model), "--tasks", str(tasks), "--ppl-answers",
                         "-o", str(tmp_path / "r.jsonl"), "--summary", str(summary))
    assert result.returncode == 0, result.stderr
    measured = json.loads(summary.read_text())["models"][0]["ppl_answers"]
    expected, n_tokens = reference_answer_ppl(tiny_untrained.model, [("12+345=", "357"), ("rev abc=", "cba")])
    assert measured["tokens"] == n_tokens == 6  # the choice task has no written answer: not scored
    assert measured["rule"] == "answers" and measured["bytes"] == 6
    assert math.isclose(measured["ppl"], expected, rel_tol=1e-4)
    assert "answer perplexity" in result.stderr


def test_ppl_answers_bad_input(tiny_untrained, tmp_path):
    choice_only = write_jsonl(tmp_path / "c.jsonl", TASKS[2:])
    out = tmp_path / "r.jsonl"
    for args, fragment in (
        (["--ppl", str(tiny_untrained.tasks / "heldout.txt")], "--ppl-answers needs --tasks"),
        (["--tasks", str(choice_only)], "c.jsonl: --ppl-answers needs tasks with a `prompt`"),
        (["--tasks", str(choice_only), "--chat-template", "model"], "without --chat-template"),
    ):
        result = run_orstack("bench", str(tiny_untrained.model), "--ppl-answers", *args, "-o", str(out))
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
        assert not out.exists()
