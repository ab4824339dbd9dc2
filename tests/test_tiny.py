"""orstack tiny: task generators, tokenizer, deterministic training, checkpoint, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_defaults, run_orstack, tree_hash

from orstack.tiny.tasks import CELLS, FAMILIES, GENERATORS, MUL_DIGITS, STRING_LENGTHS, make_heldout, training_stream

# A 30-step build (seed 0, 1 thread), recorded with the code before training moved to orstack.train.loop and
# evaluation to the transformers backend (torch 2.13 CPU): the same weights, byte for byte, and the same figures.
# sum |w| and sum w^2 over every weight after 30 steps of seed 0. Not the bytes: the float
# kernels torch picks differ by CPU (AVX2 against AVX-512/AMX), and the file's sha256 with them.
# One step fewer moves sum |w| by 2.5e-3 relative; a CPU's rounding by far less than 1e-5.
WEIGHT_SUMS_30_STEPS = (25260.70808935767, 1912.5381536874115)
ACCURACY_30_STEPS = 0.007
BY_FAMILY_30_STEPS = {"add": 0.0288, "sub": 0.0236, "mul": 0.0, "reverse": 0.0, "sort": 0.0, "copy": 0.0,
                      "compare": 0.0}


def one_line(stderr: str) -> bool:
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def _digits(n: str) -> int:
    return len(n)


def check_task(family: str, level: int, prompt: str, answer: str) -> None:
    """Recompute the answer from the prompt text alone, independently of the generators."""
    if family in ("add", "sub", "mul"):
        op = {"add": "+", "sub": "-", "mul": "*"}[family]
        m = re.fullmatch(rf"(\d+){re.escape(op)}(\d+)=", prompt)
        assert m, prompt
        a, b = int(m[1]), int(m[2])
        expected = {"add": a + b, "sub": a - b, "mul": a * b}[family]
        assert answer == str(expected)
        if family == "mul":
            assert (_digits(m[1]), _digits(m[2])) == MUL_DIGITS[level]
        else:
            assert _digits(m[1]) == _digits(m[2]) == level
            assert a >= b or family == "add"
    elif family == "compare":
        m = re.fullmatch(r"cmp (\d+) (\d+)=", prompt)
        assert m, prompt
        a, b = int(m[1]), int(m[2])
        assert answer == (">" if a > b else "<" if a < b else "=")
        assert _digits(m[1]) == _digits(m[2]) == level
    else:
        keyword = {"reverse": "rev", "sort": "sort", "copy": "copy"}[family]
        m = re.fullmatch(rf"{keyword} ([a-z]+)=", prompt)
        assert m, prompt
        s = m[1]
        lo, hi = STRING_LENGTHS[level]
        assert lo <= len(s) <= hi
        assert answer == {"reverse": s[::-1], "sort": "".join(sorted(s)), "copy": s}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_generators_give_correct_answers(family):
    rng = random.Random(7)
    for level in (1, 2, 3, 4):
        for _ in range(300):
            prompt, answer = GENERATORS[family](rng, level)
            check_task(family, level, prompt, answer)


def test_heldout_rows_follow_the_task_contract():
    rows = make_heldout(1000, seed=0)
    assert len(rows) == 1000
    assert len({r["id"] for r in rows}) == 1000
    assert len({r["prompt"] for r in rows}) == 1000
    assert {(r["family"], r["level"]) for r in rows} == set(CELLS)
    for r in rows:
        assert set(r) >= {"id", "prompt", "answer", "kind", "domain", "family", "level"}
        assert r["kind"] == ("numeric" if r["family"] in ("add", "sub", "mul") else "exact")
        check_task(r["family"], r["level"], r["prompt"], r["answer"])


def test_same_seed_same_tasks_other_seed_other_tasks():
    from orstack.tiny import TinyConfig, make_splits

    a, b, c = (make_splits(TinyConfig(seed=s, n_heldout=300, n_train_rows=300)) for s in (3, 3, 4))
    assert a.heldout == b.heldout and a.train == b.train
    assert a.heldout != c.heldout


def test_heldout_prompts_never_reach_training():
    from orstack.tiny import TinyConfig, make_splits

    splits = make_splits(TinyConfig(seed=0))
    held = {r["prompt"] for r in splits.heldout}
    assert not held & {r["prompt"] for r in splits.train}
    stream = training_stream(0, held)
    # The stream the model trains on: small cells (one-digit sums) are hit many times here.
    seen = {next(stream)[2] for _ in range(20_000)}
    assert not held & seen
    # ... and a quarter of each small cell is held out, so training still sees most of it.
    one_digit_sums = {p for p in seen if re.fullmatch(r"\d\+\d=", p)}
    assert 70 <= len(one_digit_sums) <= 76


def test_tokenizer_keeps_digits_and_letters_single_and_merges_keywords():
    from orstack.tiny.tokenizer import BOS, EOS, build_tokenizer

    tok = build_tokenizer()
    assert 260 <= len(tok) <= 300
    ids = tok("rev abc=")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [BOS, "revĠ", "a", "b", "c", "="]
    assert tok.convert_ids_to_tokens(tok("1234+5=", add_special_tokens=False)["input_ids"]) == list("1234+5=")
    text = "cmp 17 9=>\nsort dcba=abcd ünïcode"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok.eos_token == EOS and tok.pad_token_id is not None


def test_training_is_bit_identical_for_the_same_seed():
    import torch

    from orstack.tiny.model import TinyConfig, run
    from orstack.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    held = make_heldout(56, seed=0)

    def weights(seed):
        config = TinyConfig(seed=seed, steps=3, batch_size=8, warmup=1, n_heldout=56)
        model, metrics = run(config, tok, held)
        assert metrics["trained"] and 0 <= metrics["heldout_accuracy"] <= 1
        return model.state_dict()

    a, b, c = weights(5), weights(5), weights(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_micro_batches_give_the_whole_batch_gradient():
    import torch

    from orstack.tiny.model import IGNORE, TinyConfig, batch_loss_backward, build_model, collate, encode_example
    from orstack.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_model(TinyConfig(seed=1), tok)
    rng = random.Random(0)
    batch = [encode_example(tok, *GENERATORS[f](rng, lv)) for f, lv in CELLS for _ in range(2)]

    # Reference: one padded batch, the mean over every scored token.
    input_ids, labels = collate(batch, tok.pad_token_id)
    logits = model(input_ids=input_ids).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                  ignore_index=IGNORE)
    model.zero_grad()
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    loss = batch_loss_backward(model, batch, tok.pad_token_id, micro_batches=4)
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_untrained_cli_writes_checkpoint_and_tasks(tmp_path):
    from orstack.io.manifest import config_from_manifest
    from orstack.tiny import TinyConfig

    out, tasks = tmp_path / "tiny", tmp_path / "tasks"
    done = run_orstack("--seed", "2", "tiny", "-o", str(out), "--untrained", "--tasks-out", str(tasks))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["stage"] == "tiny"
    assert manifest["args"]["seed"] == 2 and manifest["args"]["untrained"] is True
    assert config_from_manifest(manifest) == TinyConfig(seed=2, untrained=True)
    assert sorted(p.name for p in tasks.iterdir()) == ["corpus.txt", "heldout.jsonl", "heldout.txt", "train.jsonl"]
    heldout = [json.loads(line) for line in (tasks / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 1000
    text = (tasks / "heldout.txt").read_text().splitlines()
    assert text[0] == heldout[0]["prompt"] + heldout[0]["answer"]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0
    assert config["tie_word_embeddings"] is False
    # A second run replaces its own earlier output and rewrites the task files in place (others kept).
    (tasks / "mine.txt").write_text("keep me")
    done = run_orstack("--seed", "2", "tiny", "-o", str(out), "--untrained", "--tasks-out", str(tasks))
    assert done.returncode == 0, done.stderr
    assert (tasks / "mine.txt").read_text() == "keep me"


def test_cli_defaults_are_the_config_defaults():
    from orstack.tiny import TinyConfig

    cli = cli_defaults("tiny")
    fields = {f.name for f in dataclasses.fields(TinyConfig)}
    assert set(cli) - fields == {"output", "tasks_out"}
    assert {name: cli[name] for name in set(cli) & fields} == {n: getattr(TinyConfig(), n) for n in set(cli) & fields}
    assert cli_defaults()["seed"] == TinyConfig().seed


def test_training_and_evaluation_are_unchanged(tmp_path):
    """Same seed and steps: the weights of the code before the shared loop (to float rounding:
    bit for bit on one CPU), and its held-out figures through the backend's batched greedy
    decoding."""
    import numpy as np
    from safetensors.numpy import load_file

    from orstack.tiny import TinyConfig, build

    result = build(TinyConfig(seed=0, steps=30), tmp_path / "model", tmp_path / "tasks")
    weights = [w.astype(np.float64) for w in load_file(str(tmp_path / "model" / "model.safetensors")).values()]
    sums = (sum(float(np.abs(w).sum()) for w in weights), sum(float((w * w).sum()) for w in weights))
    assert sums == pytest.approx(WEIGHT_SUMS_30_STEPS, rel=1e-5)
    assert result.metrics["heldout_accuracy"] == ACCURACY_30_STEPS
    assert result.metrics["accuracy_by_family"] == BY_FAMILY_30_STEPS


def test_untrained_model_loads_and_generates(tiny_untrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_untrained.model)
    model = AutoModelForCausalLM.from_pretrained(tiny_untrained.model)
    batch = tok(["1+2=", "rev abcd="], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 4


def test_trained_model_solves_easy_tasks_and_fails_hard_ones(tiny_trained):
    """Through plain transformers, left-padded batches, the checkpoint's generation config:
    what any consumer (bench included) sees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((tiny_trained.model / "orstack.json").read_text())
    assert manifest["stage"] == "tiny" and manifest["metrics"]["trained"]
    tok = AutoTokenizer.from_pretrained(tiny_trained.model)
    model = AutoModelForCausalLM.from_pretrained(tiny_trained.model)
    rows = [json.loads(line) for line in (tiny_trained.tasks / "heldout.jsonl").read_text().splitlines()]
    easy = [r for r in rows if (r["family"], r["level"]) in (("copy", 1), ("compare", 1), ("reverse", 1))]
    hard = [r for r in rows if (r["family"], r["level"]) in (("mul", 4), ("add", 4))]
    acc = {}
    for name, subset in (("easy", easy), ("hard", hard)):
        batch = tok([r["prompt"] for r in subset], return_tensors="pt", padding=True)
        out = model.generate(**batch)  # greedy, stops at EOS: from generation_config.json
        texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        acc[name] = sum(t.strip() == r["answer"] for t, r in zip(texts, subset, strict=True)) / len(subset)
    assert acc["easy"] >= 0.5 > 0.2 >= acc["hard"], acc
    # Generation ends with EOS rather than running to max_new_tokens.
    assert (out == tok.eos_token_id).any(dim=1).float().mean() > 0.5


def test_evaluation_decodes_each_prompt_as_it_would_alone(tiny_trained):
    """The held-out figures come from the transformers backend's batched greedy decoding; each
    answer is what plain transformers' greedy `generate` gives for that prompt alone."""
    import torch

    from orstack.io.checkpoint import load_model
    from orstack.tiny.model import greedy_answers

    model, tok = load_model(tiny_trained.model)
    rows = [json.loads(line) for line in (tiny_trained.tasks / "heldout.jsonl").read_text().splitlines()][::20]
    prompts = [r["prompt"] for r in rows]
    batched = greedy_answers(model, tok, prompts, max_new_tokens=16, batch_size=16)
    with torch.no_grad():
        for prompt, answer in zip(prompts, batched, strict=True):
            ids = tok(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
            assert answer == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), prompt
    assert sum(a.strip() == r["answer"] for a, r in zip(batched, rows)) > 0


def test_bad_step_count_exits_2_with_one_line(tmp_path):
    done = run_orstack("tiny", "-o", str(tmp_path / "m"), "--steps", "0")
    assert done.returncode == 2 and done.stdout == "" and one_line(done.stderr) and "--steps" in done.stderr
    assert not (tmp_path / "m").exists()


def test_output_that_is_a_file_exits_2(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    done = run_orstack("tiny", "-o", str(target), "--untrained")
    assert done.returncode == 2 and done.stdout == "" and one_line(done.stderr)
    assert f"-o {target}: is a file" in done.stderr
    assert target.read_text() == "keep me"


def test_foreign_non_empty_directory_is_not_replaced(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    before = tree_hash(target)
    done = run_orstack("tiny", "-o", str(target), "--untrained")
    assert done.returncode == 2 and one_line(done.stderr) and "not written by orstack" in done.stderr
    assert tree_hash(target) == before


def test_tasks_out_that_is_a_file_exits_2(tmp_path):
    target = tmp_path / "tasks"
    target.write_text("x")
    done = run_orstack("tiny", "-o", str(tmp_path / "m"), "--untrained", "--tasks-out", str(target))
    assert done.returncode == 2 and one_line(done.stderr) and f"--tasks-out {target}: is a file" in done.stderr
    assert target.read_text() == "x" and not (tmp_path / "m").exists()


def test_device_reaches_the_build(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    done = run_orstack("--device", "cuda", "tiny", "-o", str(tmp_path / "m"), "--steps", "2")
    assert done.returncode == 2 and one_line(done.stderr) and "--device cuda" in done.stderr
    assert not (tmp_path / "m").exists()


def test_missing_output_parent_exits_2_before_training(tmp_path):
    done = run_orstack("tiny", "-o", str(tmp_path / "no" / "such" / "m"))
    assert done.returncode == 2 and one_line(done.stderr) and "does not exist" in done.stderr
    assert not (tmp_path / "no").exists()


def test_command_module_does_not_import_torch():
    code = "import sys, orstack.commands.tiny; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0
