"""distill generate (tiers, verifier-driven escalation, new problems, dedup) and distill train
(prompt masking, NaN-free masking, GKD losses, vocabulary check, adapter save/merge/load)."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_random_llama, cli_defaults, run_orstack, tree_hash

from orstack.errors import BadInput
from orstack.runtime import Runtime

RUNTIME = Runtime(device="cpu")

ORACLE = """\
import json, random, re, sys
for line in sys.stdin:
    t = json.loads(line)
    assert "answer" not in t and "tests" not in t, "teachers must not see the answer"
    if t.get("request") == "variant":
        rng = random.Random(t["id"])
        a, b = rng.randrange(1000), rng.randrange(1000)
        reply = f"Problem: {a}+{b}=\\nAnswer: {a + b}"
    else:
        m = re.fullmatch(r"(\\d+)\\+(\\d+)=", t["prompt"])
        reply = str(int(m[1]) + int(m[2])) if m else "?"
    print(json.dumps({"id": t["id"], "response": reply}))
"""
WRONG = """\
import json, sys
for line in sys.stdin:
    t = json.loads(line)
    k = t.get("n", 0) + 100 * t.get("cluster", 0)
    reply = f"Problem: {k}+{k}=\\nAnswer: {2 * k + 1}" if t.get("request") else "-1"
    print(json.dumps({"id": t["id"], "response": reply}))
"""


def one_line(stderr: str) -> bool:
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


@pytest.fixture
def teachers(tmp_path):
    (tmp_path / "oracle.py").write_text(ORACLE, encoding="utf-8")
    (tmp_path / "wrong.py").write_text(WRONG, encoding="utf-8")
    return f"cmd:{sys.executable} {tmp_path / 'wrong.py'}", f"cmd:{sys.executable} {tmp_path / 'oracle.py'}"


def failures_file(path: Path, n: int = 6) -> Path:
    rows = [{"id": f"add-{i}", "prompt": f"{10 + i}+{7 * i}=", "answer": str(10 + 8 * i), "kind": "numeric",
             "model": "student", "output": "0", "correct": False, "cluster": i % 2, "cluster_label": f"c{i % 2}",
             "family": "add", "level": 2} for i in range(n)]
    rows.append(dict(rows[0], id="dup"))  # the same problem twice
    rows.append({"id": "fine", "prompt": "1+1=", "answer": "2", "kind": "numeric", "correct": True, "cluster": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_escalation_goes_to_the_next_tier_only_on_rejection(tmp_path, teachers):
    from orstack.distill.generate import GenerateConfig, generate, load_failures
    from orstack.io.jsonl import read_jsonl_numbered
    from orstack.teachers import open_teacher

    wrong, oracle = teachers
    clusters = load_failures(list(read_jsonl_numbered(failures_file(tmp_path / "f.jsonl"))), "f.jsonl")
    assert sorted(clusters) == [0, 1] and sum(map(len, clusters.values())) == 7  # the correct row is skipped

    examples, report = generate(clusters, [open_teacher(wrong, RUNTIME), open_teacher(oracle, RUNTIME)],
                                GenerateConfig("f.jsonl", [wrong, oracle]))
    assert report.duplicates == 1 and len(examples) == 6
    assert all(e["source"] == f"tier2:{oracle}" and e["verified"] and e["check"] == "answer" for e in examples)
    assert {e["task_id"] for e in examples} == {f"add-{i}" for i in range(6)}
    by_tier = {(r["tier"], r["cluster"]): r for r in report.rows()}
    assert by_tier[(1, 0)]["asked"] == 3 and by_tier[(1, 0)]["escalated"] == 3 and by_tier[(1, 0)]["accepted"] == 0
    assert by_tier[(2, 0)]["asked"] == 3 and by_tier[(2, 0)]["accepted"] == 3
    # Examples keep the task's own fields; result fields are gone.
    assert examples[0]["family"] == "add" and "output" not in examples[0] and "correct" not in examples[0]

    # The right teacher first: nothing escalates, the wrong one is never asked.
    wrong_t = open_teacher(wrong, RUNTIME)
    examples, report = generate(clusters, [open_teacher(oracle, RUNTIME), wrong_t],
                                GenerateConfig("f.jsonl", [oracle, wrong]))
    assert all(e["source"].startswith("tier1:") for e in examples) and wrong_t.requests == 0


def test_new_problems_are_checked_by_agreement(tmp_path, teachers):
    from orstack.distill.generate import GenerateConfig, generate, load_failures
    from orstack.io.jsonl import read_jsonl_numbered
    from orstack.teachers import open_teacher

    wrong, oracle = teachers
    clusters = load_failures(list(read_jsonl_numbered(failures_file(tmp_path / "f.jsonl"))), "f.jsonl")
    config = GenerateConfig("f.jsonl", [wrong, oracle], per_cluster=4)
    examples, report = generate(clusters, [open_teacher(wrong, RUNTIME), open_teacher(oracle, RUNTIME)], config)
    new = [e for e in examples if e["origin"] == "variant"]
    assert len(new) == 8 and all(e["check"] == "agreement" for e in new)
    for e in new:  # the kept answer is right
        a, b = e["prompt"].rstrip("=").split("+")
        assert e["response"] == str(int(a) + int(b)) == e["answer"]
    assert all(e["generator"] == f"tier2:{oracle}" for e in new)
    # The wrong teacher's problems carry wrong answers: no solver agrees, so every request escalates.
    variant = {r["tier"]: r for r in report.rows() if r["what"] == "variant" and r["cluster"] == 0}
    assert (variant[1]["asked"], variant[1]["escalated"], variant[1]["accepted"]) == (4, 4, 0)
    assert (variant[2]["asked"], variant[2]["accepted"]) == (4, 4)


CHAT_ORACLE = """\
import json, random, re, sys
for line in sys.stdin:
    t = json.loads(line)
    if t.get("request") == "variant":
        a = random.Random(t["id"]).randrange(6)  # few distinct problems: some repeat the held-out ones
        reply = f"Problem: What is {a} + 1?\\nAnswer: {a + 1}"
    else:
        m = re.search(r"What is (\\d+) \\+ (\\d+)\\?", t["messages"][-1]["content"])
        reply = str(int(m[1]) + int(m[2])) if m else "?"
    print(json.dumps({"id": t["id"], "response": reply}))
"""


def test_conversation_failures_get_new_conversations_and_held_out_problems_are_excluded(tmp_path):
    from orstack.distill.generate import GenerateConfig, generate, load_failures
    from orstack.io.jsonl import read_jsonl_numbered
    from orstack.teachers import open_teacher

    (tmp_path / "oracle.py").write_text(CHAT_ORACLE, encoding="utf-8")
    oracle = f"cmd:{sys.executable} {tmp_path / 'oracle.py'}"
    system = {"role": "system", "content": "Be brief."}
    rows = [{"id": f"q{i}", "messages": [system, {"role": "user", "content": f"What is {10 + i} + 1?"}],
             "answer": str(11 + i), "kind": "numeric", "correct": False, "cluster": 0} for i in range(3)]
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    held_out = [{"id": f"b{a}", "messages": [{"role": "user", "content": f"What is {a} + 1?"}], "answer": str(a + 1)}
                for a in (0, 1, 2)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
    clusters = load_failures(list(read_jsonl_numbered(tmp_path / "f.jsonl")), "f.jsonl")

    def new_examples(exclude):
        config = GenerateConfig("f.jsonl", [oracle], per_cluster=12, exclude=exclude)
        examples, report = generate(clusters, [open_teacher(oracle, RUNTIME)], config)
        return [e for e in examples if e["origin"] == "variant"], report

    new, report = new_examples([])
    assert new and report.contaminated == 0
    for e in new:  # the failure's conversation with its user turn replaced, answered by the teacher
        assert e["messages"][0] == system and e["messages"][-1]["role"] == "assistant"
        a = int(e["messages"][1]["content"].split()[2])
        assert e["messages"][-1]["content"] == e["answer"] == str(a + 1)
    assert any(int(e["messages"][1]["content"].split()[2]) <= 2 for e in new)  # the held-out problems leak
    clean, report = new_examples([str(tmp_path / "b.jsonl")])
    assert report.contaminated > 0
    assert clean and all(int(e["messages"][1]["content"].split()[2]) > 2 for e in clean)


def test_unverifiable_rows_take_the_first_answer(tmp_path, teachers):
    from orstack.distill.generate import GenerateConfig, generate
    from orstack.teachers import open_teacher

    wrong, oracle = teachers
    clusters = {0: [{"id": "t", "prompt": "write a haiku", "kind": "text"}]}
    examples, _ = generate(clusters, [open_teacher(wrong, RUNTIME), open_teacher(oracle, RUNTIME)],
                           GenerateConfig("-", [wrong, oracle]))
    assert len(examples) == 1 and examples[0]["verified"] is False and examples[0]["source"].startswith("tier1:")


def test_near_duplicates():
    from orstack.distill.generate import Deduper

    d = Deduper(0.8)
    long = "Tom has seven apples and gives two of them to his sister how many are left"
    assert d.is_new(long) and not d.is_new(long.upper() + "  ")
    assert not d.is_new(long.replace("left", "left over"))
    assert d.is_new("12+345=") and d.is_new("12+346=")  # short prompts: one character is a new problem


def test_generate_cli_writes_examples_and_report(tmp_path, teachers):
    wrong, oracle = teachers
    out, rep = tmp_path / "train.jsonl", tmp_path / "report.json"
    done = run_orstack("distill", "generate", "--failures", str(failures_file(tmp_path / "f.jsonl")), "--teacher",
                       wrong, "--teacher", oracle, "--per-cluster", "2", "-o", str(out), "--report", str(rep))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and all(r["verified"] for r in rows)
    assert json.loads(rep.read_text())["examples"] == 10


def test_generate_bad_input(tmp_path, teachers):
    wrong, oracle = teachers
    out = tmp_path / "train.jsonl"
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"id": "x", "prompt": "1+1=", "answer": "2", "correct": True}) + "\n")
    done = run_orstack("distill", "generate", "--failures", str(none), "--teacher", oracle, "-o", str(out))
    assert done.returncode == 2 and "no failures" in done.stderr and one_line(done.stderr) and not out.exists()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = failures_file(tmp_path / "f.jsonl")
    done = run_orstack("distill", "generate", "--failures", str(failures), "--teacher", f"http://127.0.0.1:{port}/v1#m",
                       "-o", str(out))
    assert done.returncode == 2 and "cannot reach" in done.stderr and one_line(done.stderr) and not out.exists()

    done = run_orstack("distill", "generate", "--failures", str(failures), "--teacher", wrong, "-o", str(out))
    assert done.returncode == 2 and "nothing written" in done.stderr and one_line(done.stderr) and not out.exists()

    done = run_orstack("distill", "generate", "--failures", str(failures), "--teacher", oracle, "--per-cluster", "2",
                       "--exclude", str(tmp_path / "heldout.jsonl"), "-o", str(out))
    assert done.returncode == 2 and "--exclude" in done.stderr and "heldout.jsonl: no such file" in done.stderr
    assert one_line(done.stderr) and not out.exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "correct": false}\n')
    done = run_orstack("distill", "generate", "--failures", str(bad), "--teacher", oracle, "-o", str(out))
    assert done.returncode == 2 and "bad.jsonl:1: missing required field 'prompt'" in done.stderr
    assert one_line(done.stderr) and not out.exists()
    bad.write_text('{"id": 1, "prompt": "1+1=", "correct": false}\n{"id": 2, "prompt": 7, "correct": false}\n')
    done = run_orstack("distill", "generate", "--failures", str(bad), "--teacher", oracle, "-o", str(out))
    assert done.returncode == 2 and "bad.jsonl:2: field 'prompt': expected a string, got int" in done.stderr
    assert one_line(done.stderr) and not out.exists()


# -- training ---------------------------------------------------------------------------------
def test_prompt_tokens_are_masked(random_llama):
    from orstack.io.checkpoint import load_tokenizer
    from orstack.train.data import IGNORE, collate, encode_example

    tok = load_tokenizer(random_llama)
    enc = encode_example(tok, "12+345=", "357", 64)
    n_prompt = len(tok("12+345=")["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.input_ids[-1] == tok.eos_token_id and tok.decode(enc.input_ids[n_prompt:-1]) == "357"
    batch = collate([enc, encode_example(tok, "1+1=", "2", 64)], tok.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][1, batch["attention_mask"][1] == 0] == IGNORE).all()


def test_fully_masked_rows_give_zero_not_nan():
    import torch

    from orstack.train.losses import generalized_jsd, masked_ce, per_example_ce

    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = masked_ce(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    assert torch.equal(per_example_ce(logits, labels), torch.zeros(2))
    assert generalized_jsd(logits, torch.randn(2, 5, 11), labels, 0.5).item() == 0.0
    # One masked row next to a real one: the loss is the real row's.
    labels[1, 2:] = torch.tensor([1, 2, 3])
    both = masked_ce(logits, labels)
    alone = masked_ce(logits[1:], labels[1:])
    assert torch.allclose(both, alone)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_matches_trl(beta):
    import torch

    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    from orstack.train.losses import generalized_jsd

    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 13), torch.randn(2, 6, 13)
    labels = torch.randint(0, 13, (2, 6))
    labels[0, :3] = -100
    ours = generalized_jsd(s, t, labels, beta=beta, temperature=2.0)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=beta, temperature=2.0)
    assert torch.allclose(ours, theirs, atol=1e-6)
    if beta == 0.0:  # forward KL(teacher || student) by hand
        p_t = torch.softmax(t[:, :-1] / 2, -1)
        kl = (p_t * (torch.log_softmax(t[:, :-1] / 2, -1) - torch.log_softmax(s[:, :-1] / 2, -1))).sum(-1)
        mask = labels[:, 1:] != -100
        assert torch.allclose(ours, kl[mask].mean(), atol=1e-6)


def test_vocabulary_mismatch_is_caught_before_weights_load(tmp_path, random_llama, monkeypatch):
    import orstack.io.checkpoint
    from orstack.train.vocab import check_same_vocabulary

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the vocabulary check")

    monkeypatch.setattr(orstack.io.checkpoint, "load_model", no_weights)
    other = build_random_llama(tmp_path / "other", vocab_size=280)
    with pytest.raises(BadInput, match="tokenizer differs"):
        check_same_vocabulary(str(random_llama), str(other))
    check_same_vocabulary(str(random_llama), str(random_llama))

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(tmp_path / "o"),
                       "--logits", str(other))
    assert done.returncode == 2 and "tokenizer differs" in done.stderr and one_line(done.stderr)
    assert not (tmp_path / "o").exists()


def test_adapter_save_load_and_merge_agree(tmp_path, random_llama):
    import torch

    from orstack.io.checkpoint import detect_format, load_model
    from orstack.train.config import TrainConfig
    from orstack.train.data import encode_rows
    from orstack.train.lora import apply_lora, save_trained
    from orstack.train.sft import train_sft

    torch.manual_seed(0)
    model, tok = load_model(random_llama)
    tc = TrainConfig(max_steps=3, lr=5e-3, batch_size=4, lora_rank=4)
    model = apply_lora(model, tc)
    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(8)]
    result = train_sft(model, tok, encode_rows(tok, rows, 64), tc)
    assert result.steps == 3 and result.loss_last < result.loss_first
    ids = torch.tensor([tok("12+3=")["input_ids"]])
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
    save_trained(model, tok, tmp_path / "adapter", stage="distill", config=tc, base=str(random_llama), args={},
                 metrics={})
    assert detect_format(tmp_path / "adapter") == "lora-adapter"
    manifest = json.loads((tmp_path / "adapter" / "orstack.json").read_text())
    assert manifest["base"] == str(random_llama) and manifest["parent"]["sha256"]
    merged_cfg = TrainConfig(max_steps=3, merge=True)
    save_trained(model, tok, tmp_path / "merged", stage="distill", config=merged_cfg, base=str(random_llama),
                 args={}, metrics={})
    assert (tmp_path / "merged" / "model.safetensors").exists()
    for path in ("adapter", "merged"):
        loaded, _ = load_model(tmp_path / path)
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=ids).logits, trained_logits, atol=1e-4), path
    base, _ = load_model(random_llama)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, trained_logits, atol=1e-4)


def test_recover_picks_the_hardest_rows():
    from orstack.train.data import Encoded
    from orstack.train.sft import hardest

    data = [Encoded([1], [1]) for _ in range(8)]
    assert hardest(data, [0.1, 5.0, 0.2, 3.0, 0.0, 0.3, 0.4, 0.5], 0.25) == [1, 3]


def test_train_cli_adapter_and_bad_input(tmp_path, random_llama):
    from orstack.distill import DistillTrainConfig
    from orstack.io.manifest import config_from_manifest
    from orstack.train.config import TrainConfig

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(6)))
    out, log = tmp_path / "lora", tmp_path / "log.jsonl"
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(out), "--max-steps", "2",
                       "--batch-size", "3", "--log", str(log), "--recover", "--recover-fraction", "0.5")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert (out / "adapter_config.json").exists()
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["metrics"]["recover_rows"] == 3 and manifest["args"]["recover_fraction"] == 0.5
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    # The manifest is the config: it loads back into exactly the run's DistillTrainConfig.
    assert manifest["config_class"] == "orstack.distill.train:DistillTrainConfig"
    assert config_from_manifest(manifest) == DistillTrainConfig(
        data=str(data), train=TrainConfig(max_steps=2, batch_size=3, log=str(log)), recover=True,
        recover_fraction=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "log.jsonl", "lora"]  # no temporary left

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    done = run_orstack("distill", "train", str(random_llama), "--data", str(bad), "-o", str(tmp_path / "o2"))
    assert done.returncode == 2 and "bad.jsonl:1: missing required field 'response'" in done.stderr
    assert one_line(done.stderr) and not (tmp_path / "o2").exists()
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(tmp_path / "o3"),
                       "--full", "--merge")
    assert done.returncode == 2 and "--merge" in done.stderr and one_line(done.stderr)


def test_train_cli_defaults_are_the_config_defaults():
    from orstack.distill import DistillTrainConfig
    from orstack.train.config import TrainConfig
    from orstack.train.sft import DistillLoss

    cli = cli_defaults("distill", "train")
    inputs_and_outputs = {"student", "data", "output"}
    train = {f.name for f in dataclasses.fields(TrainConfig)} & set(cli)
    loss = {"kd_beta": "beta", "kd_temperature": "temperature", "kd_alpha": "alpha", "t2_scale": "t2_scale"}
    top = {"logits": "logits_teacher", "recover": "recover", "recover_fraction": "recover_fraction",
           "recover_mode": "recover_mode",
           "chat_template": "chat_template", "max_accuracy_drop": "max_accuracy_drop",
           "max_cluster_drop": "max_cluster_drop", "force": "force"}
    assert set(cli) == inputs_and_outputs | train | set(loss) | set(top)  # every option is accounted for
    config = DistillTrainConfig(data="d.jsonl")
    # repeatable options (--eval, --mix) default to [] in typer and () in the config
    assert {name: tuple(cli[name]) if isinstance(cli[name], list) else cli[name] for name in train} == {
        name: getattr(TrainConfig(), name) for name in train}
    assert {option: cli[option] for option in loss} == {o: getattr(DistillLoss(), f) for o, f in loss.items()}
    assert {option: cli[option] for option in top} == {o: getattr(config, f) for o, f in top.items()}
    assert config.train == TrainConfig() and config.distill == DistillLoss()
    assert cli_defaults()["seed"] == TrainConfig().seed


def test_generate_cli_defaults_are_the_config_defaults():
    from orstack.distill import GenerateConfig
    from orstack.teachers import TeacherOptions

    cli = cli_defaults("distill", "generate")
    options = {"max_new_tokens": "max_new_tokens", "stop": "stop", "timeout": "timeout", "retries": "retries",
               "concurrency": "concurrency", "rate_limit": "rate_limit", "api_key_env": "api_key_env",
               "teacher_api": "api", "chat_template": "chat_template"}
    judging = {"judge", "judge_min", "judge_rubric"}
    assert set(cli) == {"failures", "teacher", "output", "report", "per_cluster", "budget", "shard", "exclude",
                        *judging, *options}
    assert cli["exclude"] == [] and GenerateConfig("f.jsonl", ["cmd:cat"]).exclude == []
    assert cli["shard"] is None and GenerateConfig("f.jsonl", ["cmd:cat"]).shard is None
    assert {o: cli[o] for o in options} == {o: getattr(TeacherOptions(), f) for o, f in options.items()}
    config = GenerateConfig("f.jsonl", ["cmd:cat"])
    assert int(cli["per_cluster"]) == config.per_cluster and config.teacher == TeacherOptions()
    assert cli["budget"] == config.budget and cli["judge"] is None and config.judge is None


def test_train_refuses_a_file_where_the_adapter_goes(tmp_path, random_llama):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    out = tmp_path / "adapter"
    out.write_text("my notes\n")
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(out), "--max-steps", "1")
    assert done.returncode == 2 and f"-o {out}: is a file" in done.stderr and one_line(done.stderr)
    assert out.read_text() == "my notes\n"
    log = tmp_path / "logdir"
    log.mkdir()
    (log / "keep.txt").write_text("x")
    before = tree_hash(log)
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(tmp_path / "o"),
                       "--log", str(log))
    assert done.returncode == 2 and f"--log {log}: is a directory" in done.stderr and one_line(done.stderr)
    assert tree_hash(log) == before and not (tmp_path / "o").exists()


def test_generate_refuses_an_existing_directory_as_output(tmp_path, teachers):
    _, oracle = teachers
    out = tmp_path / "mydir"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = tree_hash(out)
    done = run_orstack("distill", "generate", "--failures", str(failures_file(tmp_path / "f.jsonl")), "--teacher",
                       oracle, "-o", str(out))
    assert done.returncode == 2 and f"-o {out}: is a directory" in done.stderr and one_line(done.stderr)
    assert tree_hash(out) == before
    report = tmp_path / "report.json"
    done = run_orstack("distill", "generate", "--failures", str(tmp_path / "f.jsonl"), "--teacher", oracle,
                       "-o", str(report), "--report", str(report))
    assert done.returncode == 2 and "the same path as -o" in done.stderr and not report.exists()


def test_train_reads_data_from_stdin(tmp_path, random_llama):
    rows = "".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(4))
    out = tmp_path / "lora"
    done = run_orstack("distill", "train", str(random_llama), "--data", "-", "-o", str(out), "--max-steps", "1",
                       "--batch-size", "2", stdin=rows)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["args"]["data"] == "-" and manifest["metrics"]["rows"] == 4
    done = run_orstack("distill", "train", str(random_llama), "--data", "-", "-o", str(tmp_path / "o2"),
                       stdin='{"prompt": "1+1=", "response": "2"}\n{"prompt": ["1+1="], "response": "2"}\n')
    assert done.returncode == 2 and "<stdin>:2: field 'prompt': expected a string, got list" in done.stderr
    assert one_line(done.stderr) and not (tmp_path / "o2").exists()


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": 12, "response": "2"}, "d.jsonl:2: field 'prompt': expected a string, got int"),
    ({"prompt": "1+1=", "response": None}, "d.jsonl:2: missing required field 'response'"),
    ({"text": 5}, "d.jsonl:2: field 'text': expected a string, got int"),
    ({"prompt": "1+1=", "response": "2", "weight": "high"}, "d.jsonl:2: field 'weight': expected a number, got str"),
    ({"answer": "2"}, "d.jsonl:2: missing required field 'prompt'"),
])
def test_train_data_field_types_are_checked_before_loading(tmp_path, random_llama, row, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "o"
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(out))
    assert done.returncode == 2 and message in done.stderr and one_line(done.stderr), done.stderr
    assert not out.exists()


def test_encoder_student_is_refused(tmp_path):
    """A sentence encoder (BERT, as all-MiniLM is) cannot be a distillation student."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    student = tmp_path / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(student)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "1": 2, "+": 3, "=": 4, "2": 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(student)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    out = tmp_path / "o"
    done = run_orstack("distill", "train", str(student), "--data", str(data), "-o", str(out), "--max-steps", "1")
    assert done.returncode == 2 and one_line(done.stderr), done.stderr
    assert f"{student}: " in done.stderr and "not a causal language model" in done.stderr
    assert not out.exists()


def test_train_with_logit_distillation_end_to_end(tmp_path, random_llama):
    """`--logits TEACHER`: a same-vocabulary teacher (other weights), the KD loss falls, the manifest
    records the teacher and the loss."""
    from orstack.distill import DistillTrainConfig
    from orstack.io.manifest import config_from_manifest
    from orstack.train.sft import DistillLoss

    teacher = build_random_llama(tmp_path / "teacher", seed=1)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "response": str(2 * i)}) + "\n" for i in range(8)))
    out, log = tmp_path / "student-kd", tmp_path / "kd.jsonl"
    done = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(out), "--logits",
                       str(teacher), "--kd-beta", "0.5", "--kd-temperature", "2", "--t2-scale",
                       "--max-steps", "8", "--batch-size", "8", "--lr", "5e-3", "--log", str(log))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 8 and all(r["kd"] > 0 for r in rows)
    # --kd-alpha 1 (the default): the loss is the distillation term alone, on the same batch every step.
    assert [r["loss"] for r in rows] == [r["kd"] for r in rows] and rows[-1]["kd"] < 0.7 * rows[0]["kd"]
    manifest = json.loads((out / "orstack.json").read_text())
    assert manifest["args"]["logits_teacher"] == str(teacher)
    assert manifest["args"]["distill"] == {"beta": 0.5, "temperature": 2.0, "alpha": 1.0, "t2_scale": True}
    config = config_from_manifest(manifest)
    assert isinstance(config, DistillTrainConfig) and config.distill == DistillLoss(0.5, 2.0, 1.0, True)
    assert manifest["metrics"]["loss_last"] < manifest["metrics"]["loss_first"]


@pytest.mark.slow
def test_train_runs_under_torchrun_with_two_gloo_processes(tmp_path, random_llama):
    import os
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    orstack_bin = shutil.which("orstack") or str(Path(sys.executable).parent / "orstack")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(8)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, ORSTACK_LOG=str(log))  # torchrun's own parser would take --log
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), orstack_bin, "distill",
                           "train", str(random_llama), "--data", str(data), "-o", str(tmp_path / "out"),
                           "--max-steps", "2", "--batch-size", "2"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapter_config.json").exists()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens"] > 0 for r in rows)
