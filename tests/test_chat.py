"""Chat: `messages` tasks and training rows, --chat-template, and agreement of the chat template's
rendering between transformers and llama.cpp (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_orstack, tree_hash

STYLES = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>", "chatml": "<|im_end|>"}
CONVERSATIONS = [
    [{"role": "user", "content": "rev abc=?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*4="},
     {"role": "assistant", "content": "12"}, {"role": "user", "content": "sort dcba"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Here:\n```python\n"}],  # a prefill
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def bench_bad(tmp_path: Path, model: Path, rows: list, *extra: str) -> tuple[str, int]:
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    out = tmp_path / "rows.jsonl"
    before = tree_hash(tmp_path)
    result = run_orstack("bench", str(model), "--tasks", str(tasks), "-o", str(out), *extra)
    assert tree_hash(tmp_path) == before, "nothing is written on bad input"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0], result.returncode


GOOD = {"id": 1, "kind": "text", "prompt": "hi"}


@pytest.mark.parametrize(("task", "needle"), [
    ({"id": 1, "kind": "text", "messages": "hello"}, "tasks.jsonl:2: field 'messages': expected a list"),
    ({"id": 1, "kind": "text", "messages": []}, "tasks.jsonl:2: field 'messages': empty conversation"),
    ({"id": 1, "kind": "text", "messages": ["hi"]}, "tasks.jsonl:2: field 'messages[0]': expected an object"),
    ({"id": 1, "kind": "text", "messages": [{"role": "robot", "content": "hi"}]},
     "tasks.jsonl:2: field 'messages[0]'.role: unknown role 'robot'"),
    ({"id": 1, "kind": "text", "messages": [{"role": "user", "content": ""}]},
     "tasks.jsonl:2: field 'messages[0]'.content: expected a non-empty string"),
    ({"id": 1, "kind": "text", "messages": [{"role": "user", "content": 3}]},
     "tasks.jsonl:2: field 'messages[0]'.content: expected a non-empty string, got int"),
    ({"id": 1, "kind": "text", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "tasks.jsonl:2: field 'messages[1]'.role: a system turn may only come first"),
    ({"id": 1, "kind": "text", "prompt": "a", "messages": [{"role": "user", "content": "a"}]},
     "tasks.jsonl:2: fields 'prompt' and 'messages': give exactly one of them"),
])
def test_malformed_messages_are_one_line_naming_file_line_field(tmp_path, random_llama, task, needle):
    line, code = bench_bad(tmp_path, random_llama, [{**GOOD, "id": 0}, task])
    assert code == 2
    assert needle in line


def test_messages_task_for_a_model_without_a_template(tmp_path, family_checkpoint):
    model = family_checkpoint("llama", chat=None)
    rows = [{**GOOD, "id": 0}, {"id": 1, "kind": "text", "messages": [{"role": "user", "content": "hi"}]}]
    line, code = bench_bad(tmp_path, model, rows)
    assert code == 2
    assert line.endswith(f"tasks.jsonl:2: field 'messages': {model} has no chat template; "
                         "pass --chat-template FILE.jinja"), line
    line, code = bench_bad(tmp_path, model, [GOOD], "--chat-template", "model")
    assert code == 2 and "tasks.jsonl:1: field 'prompt': --chat-template model" in line, line
    line, code = bench_bad(tmp_path, model, [GOOD], "--chat-template", str(tmp_path / "missing.jinja"))
    assert code == 2 and "missing.jinja: no such file" in line, line


def test_template_file_gives_a_model_without_one_a_template(tmp_path, family_checkpoint):
    from families import CHAT_STYLES

    from orstack.backends.hf import HFBackend

    model = family_checkpoint("llama", chat=None)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_STYLES["chatml"][0])
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [
        {"id": "m", "kind": "text", "messages": [{"role": "user", "content": "rev abc"}], "max_new_tokens": 3},
        {"id": "p", "kind": "text", "prompt": "rev abc", "max_new_tokens": 3}])
    out = tmp_path / "rows.jsonl"
    summary = tmp_path / "s.json"
    result = run_orstack("bench", str(model), "--tasks", str(tasks), "--chat-template", str(template), "-o", str(out),
                         "--summary", str(summary))
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    backend = HFBackend(str(model), chat_template=str(template))
    rendered = "<|im_start|>user\nrev abc<|im_end|>\n<|im_start|>assistant\n"
    assert backend.prompt_text("rev abc") == rendered
    ids = backend.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # both tasks went through the file's template (a prompt is one user turn), so they read the same tokens
    assert rows["m"]["prompt_tokens"] == rows["p"]["prompt_tokens"] == len(ids)
    assert rows["m"]["messages"] == [{"role": "user", "content": "rev abc"}] and rows["m"]["prompt"] is None
    saved = json.loads(summary.read_text())
    assert saved["config"]["chat_template"] == str(template)
    import hashlib

    assert saved["models"][0]["chat_template_sha256"] == hashlib.sha256(template.read_bytes()).hexdigest()


def test_prompt_tasks_stay_raw_without_the_option(tmp_path, family_checkpoint):
    """Scores stay comparable: a `prompt` task is fed as-is unless --chat-template is given, even
    on a model with a template; with `--chat-template model` it becomes one user turn."""
    from orstack.backends.hf import HFBackend

    model = family_checkpoint("llama", chat="chatml")
    raw = HFBackend(str(model))
    assert raw.encode_prompt("rev abc") == raw.tokenizer("rev abc")["input_ids"]
    assert raw._stop_ids("rev abc") == raw.eos_ids  # no end-of-turn stop for a raw prompt
    templated = HFBackend(str(model), chat_template="model")
    assert templated.encode_prompt("rev abc") == raw.encode_prompt([{"role": "user", "content": "rev abc"}])
    assert templated.encode_prompt("rev abc") == raw.tokenizer.apply_chat_template(
        [{"role": "user", "content": "rev abc"}], add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_llama_cpp_and_transformers_read_the_same_prompt_tokens(tmp_path, family_checkpoint, style):
    """The GGUF's tokenizer.chat_template (written by `orstack gguf`), rendered with jinja2 in the
    llama.cpp backend, gives the token ids transformers' apply_chat_template gives; both find the
    template's end-of-turn token and stop there."""
    from orstack.backends.hf import HFBackend
    from orstack.backends.llamacpp import LlamaCppBackend

    model = family_checkpoint("llama", chat=style)
    gguf = tmp_path / "m.gguf"
    result = run_orstack("gguf", str(model), "--type", "f32", "--no-validate", "-o", str(gguf))
    assert result.returncode == 0, result.stderr
    hf, cpp = HFBackend(str(model)), LlamaCppBackend(str(gguf))
    try:
        for messages in CONVERSATIONS:
            ids = hf.encode_prompt(messages)
            assert cpp.encode_prompt(messages) == ids, (style, messages)
            if messages[-1]["role"] != "assistant":
                assert ids == hf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False)
        eot = hf.tokenizer.convert_tokens_to_ids(STYLES[style])
        assert hf.chat.end_of_turn == cpp.chat.end_of_turn == eot
        assert eot in hf._stop_ids(CONVERSATIONS[0]) and eot in cpp._stop_ids(CONVERSATIONS[0])
        # greedy generation from the same tokens gives the same text in both runtimes
        a = hf.generate([CONVERSATIONS[1]], max_new_tokens=8, stop=[])[0]
        b = cpp.generate([CONVERSATIONS[1]], max_new_tokens=8, stop=[])[0]
        assert (a.prompt_tokens, a.text) == (b.prompt_tokens, b.text)
    finally:
        cpp.close()


def test_generation_stops_at_the_end_of_turn_token(family_checkpoint):
    """A model whose greedy choice is the end-of-turn token stops there when the prompt went
    through the template (and runs on when it did not), even when the model's EOS is another token."""
    import torch

    from orstack.backends.hf import HFBackend

    model = family_checkpoint("llama", chat="chatml")
    backend = HFBackend(str(model))
    eot = backend.chat.end_of_turn
    # as a model whose generation config lists only <|eos|> (its template ends turns with <|im_end|>)
    backend.eos_ids = {backend.tokenizer.eos_token_id}
    with torch.no_grad():  # make the end-of-turn token every position's argmax
        backend.model.lm_head.weight[eot] += 1000.0 * backend.model.lm_head.weight.abs().max()
    chat = backend.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=5, stop=[])[0]
    raw = backend.generate(["hi"], max_new_tokens=5, stop=[])[0]
    assert chat.output_tokens == 1 and chat.text == ""
    assert raw.output_tokens == 5


def test_code_program_continues_an_open_fence():
    from orstack.tasks.verify import code_program

    tests = "def check(f):\n    assert f(2) == 4\n"
    prefill = "Here is the completed function:\n```python\ndef double(x):\n"
    task = {"kind": "code", "tests": tests, "entry_point": "double",
            "messages": [{"role": "user", "content": "Write:\n```def double(x):\n"},
                         {"role": "assistant", "content": prefill}]}
    program = code_program(task, "    return 2 * x\n")
    assert program.startswith("def double(x):\n    return 2 * x\n")
    plain = {"kind": "code", "tests": tests, "entry_point": "double",
             "prompt": "Write:\n```def double(x):\n " + prefill}
    assert code_program(plain, "    return 2 * x\n") == program


# -- training rows ------------------------------------------------------------------------------
CHAT_ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*4="},
                         {"role": "assistant", "content": "12"}, {"role": "user", "content": "rev abc"},
                         {"role": "assistant", "content": "cba"}]}


def test_messages_rows_train_on_assistant_turns_only(family_checkpoint):
    from orstack.io.checkpoint import load_tokenizer
    from orstack.train.data import encode_rows
    from orstack.train.losses import IGNORE

    tok = load_tokenizer(family_checkpoint("llama", chat="chatml"))
    [enc] = encode_rows(tok, [CHAT_ROW], 512)
    full = tok.apply_chat_template(CHAT_ROW["messages"], tokenize=False)
    assert tok.decode(enc.input_ids) == full  # the whole conversation, as the template renders it
    targets = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert [label for label in enc.labels if label != IGNORE] == targets
    # the loss is on each assistant turn's content and the end of its turn, nothing else
    assert tok.decode(targets) == "12<|im_end|>\ncba<|im_end|>\n"
    # TRL's conversational prompt/completion is the same conversation, the same labels
    [trl] = encode_rows(tok, [{"prompt": CHAT_ROW["messages"][:-1], "completion": CHAT_ROW["messages"][-1:]}], 512)
    assert (trl.input_ids, trl.labels) == (enc.input_ids, enc.labels)
    # TRL's standard prompt/completion is orstack's prompt/response
    [a] = encode_rows(tok, [{"prompt": "3*4=", "completion": "12"}], 512)
    [b] = encode_rows(tok, [{"prompt": "3*4=", "response": "12"}], 512)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    # with a --chat-template choice a prompt/response row is a user turn and an assistant turn
    [c] = encode_rows(tok, [{"prompt": "3*4=", "response": "12"}], 512, chat_template="model")
    assert tok.decode([t for t, label in zip(c.input_ids, c.labels) if label != IGNORE]) == "12<|im_end|>\n"


@pytest.mark.parametrize(("row", "needle"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "data.jsonl:2: field 'messages': no assistant turn"),
    ({"messages": "hi"}, "data.jsonl:2: field 'messages': expected a list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "data.jsonl:2: field 'messages[0]'.role: unknown role"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": "b"},
     "data.jsonl:2: field 'completion': expected a list"),
    ({"prompt": "a", "response": "b", "completion": "b"}, "data.jsonl:2: fields 'response' and 'completion'"),
])
def test_bad_training_rows(tmp_path, random_llama, row, needle):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "response": "b"}, row])
    before = tree_hash(tmp_path)
    result = run_orstack("distill", "train", str(random_llama), "--data", str(data), "-o", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tree_hash(tmp_path) == before


def test_distill_train_on_messages_records_the_template(tmp_path, family_checkpoint):
    import hashlib

    no_template = family_checkpoint("llama", chat=None)
    data = write_jsonl(tmp_path / "data.jsonl", [CHAT_ROW, CHAT_ROW])
    before = tree_hash(tmp_path)
    result = run_orstack("distill", "train", str(no_template), "--data", str(data), "--max-steps", "1",
                         "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("data.jsonl:1: field 'messages': the student has no chat template; "
                                          "pass --chat-template FILE.jinja"), result.stderr
    assert tree_hash(tmp_path) == before
    from families import CHAT_STYLES

    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_STYLES["chatml"][0])
    result = run_orstack("distill", "train", str(no_template), "--data", str(data), "--max-steps", "1",
                         "--chat-template", str(template), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "orstack.json").read_text())
    assert manifest["args"]["chat_template"] == str(template)
    assert manifest["metrics"]["chat_template_sha256"] == hashlib.sha256(template.read_bytes()).hexdigest()


# -- endpoints and rl ---------------------------------------------------------------------------
def test_endpoint_teachers_send_conversations_to_chat_completions():
    from orstack.backends.openai import OpenAIClient

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for api in ("chat", "completions"):
        client = OpenAIClient("http://127.0.0.1:1/v1", "m", api=api)
        path, payload = client._payload(messages, 8, 0.0, ["\n"])
        assert path == "/chat/completions" and payload["messages"] == messages and payload["stop"] == ["\n"]
        assert client._text({"choices": [{"message": {"content": "ok"}}]}, chat=True) == "ok"
    path, payload = OpenAIClient("http://127.0.0.1:1/v1", "m", api="completions")._payload("p", 8, 0.0, None)
    assert path == "/completions" and payload["prompt"] == "p"


def test_rl_takes_conversational_prompts_as_trl_does(tmp_path, family_checkpoint):
    from orstack.rl.grpo import trl_prompt

    conversation = [{"role": "user", "content": "3*4="}]
    assert trl_prompt({"messages": conversation}, None) == conversation  # trl's conversational format
    assert trl_prompt({"prompt": "3*4="}, None) == "3*4="  # trl's standard format, as-is
    assert trl_prompt({"prompt": "3*4="}, "model") == conversation
    no_template = family_checkpoint("llama", chat=None)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                                   {"messages": conversation, "answer": "12"}])
    result = run_orstack("rl", str(no_template), "--tasks", str(tasks), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("tasks.jsonl:2: field 'messages': " f"{no_template} has no chat template; "
                                          "pass --chat-template FILE.jinja"), result.stderr
    with_template = family_checkpoint("llama", chat="chatml")
    result = run_orstack("rl", str(with_template), "--tasks", str(tasks), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "both `messages` and `prompt` tasks" in result.stderr, result.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}], "answer": "1"}])
    result = run_orstack("rl", str(with_template), "--tasks", str(bad), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "bad.jsonl:1: field 'messages[0]'.role: unknown role 'bot'" in result.stderr
    assert tree_hash(tmp_path / "out") == "absent"  # nothing written
