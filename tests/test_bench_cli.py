"""`orstack bench` end to end: bad input, --score, several models, gates, summary and plot."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from conftest import run_orstack, tree_hash

TASKS = [
    {"id": "a1", "prompt": "12+345=", "answer": "357", "kind": "numeric", "family": "add", "level": 1},
    {"id": "r1", "prompt": "rev abc=", "answer": "cba", "kind": "exact", "family": "reverse", "level": 1},
    {"id": "c1", "prompt": "cmp 17 9=", "choices": [">", "<"], "answer": 0, "kind": "choice", "family": "compare"},
]


def ok(*args):
    result = run_orstack(*args)
    assert result.returncode == 0, result.stderr
    return result


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture
def tasks_file(tmp_path):
    return write_jsonl(tmp_path / "tasks.jsonl", TASKS)


@pytest.mark.parametrize(("lines", "message"), [
    (['{"id": "a", "prompt": "p", "kind": "exact", "answer": "x"}', '{"id": "b", "prompt": '],
     "tasks.jsonl:2: not valid JSON"),
    (['{"id": "a", "prompt": "p", "kind": "exact"}'], "tasks.jsonl:1: missing required field 'answer'"),
    (['{"id": "a", "kind": "exact", "answer": "x"}'], "tasks.jsonl:1: missing required field 'prompt'"),
    (['{"id": "a", "prompt": "p", "kind": "poem", "answer": "x"}'], "tasks.jsonl:1: field 'kind': unknown kind"),
    (['{"id": "a", "prompt": 12, "kind": "exact", "answer": "x"}'], "tasks.jsonl:1: field 'prompt': expected a string"),
    (['{"id": "a", "prompt": "p", "kind": "exact", "answer": "x"}', '{"id": "a", "prompt": "q", "kind": "text"}'],
     "tasks.jsonl:2: field 'id': duplicate id 'a'"),
])
def test_bad_task_files(random_llama, tmp_path, lines, message):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("the previous results\n")
    before = tree_hash(tmp_path)
    result = run_orstack("bench", random_llama, "--tasks", tasks, "-o", out)
    assert_one_line_error(result, 2, message)
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "{tmp}/missing-model", "--tasks", "{tasks}"], "missing-model: no such checkpoint"),
    (["bench", "{tmp}", "--tasks", "{tasks}"], "not a checkpoint directory"),
    (["bench", "{tmp}/m.gguf", "--tasks", "{tasks}"], "m.gguf: no such GGUF file"),
    (["bench", "{model}", "--tasks", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    (["bench", "{model}"], "nothing to measure"),
    (["bench", "--tasks", "{tasks}"], "no MODEL given"),
    (["bench", "{model}", "--ppl", "{tasks}", "--ppl-rule", "exact"], "--ppl-rule"),
    (["bench", "{model}", "--tasks", "{tasks}", "-o", "{tmp}/no/such/dir/out.jsonl"], "does not exist"),
    (["bench", "{model}", "--score", "{tasks}"], "--score scores existing outputs"),
    (["bench", "--score", "{tasks}", "--tasks", "{tasks}"], "--score scores existing outputs"),
    (["bench", "--score", "{tasks}"], "tasks.jsonl:1: missing required field 'output'"),
    (["bench", "{model}", "--ppl", "{tasks}", "--fail-under", "0.5"], "--fail-under needs"),
    (["bench", "{model}", "--tasks", "{tasks}", "--fail-under", "1.5"], "--fail-under"),
    (["bench", "{model}", "--ppl", "{tasks}", "--plot", "{tmp}/p.png"], "--plot needs --tasks"),
    (["bench", "{model}", "--tasks", "{tasks}", "-o", "{tasks}"], "would overwrite the input"),
    (["bench", "{model}", "--tasks", "{tasks}", "-o", "{tmp}/r.jsonl", "--summary", "{tmp}/r.jsonl"],
     "--summary {tmp}/r.jsonl: the same path as -o"),
    (["bench", "{model}", "--tasks", "{tasks}", "--summary", "{tmp}/p.png", "--plot", "{tmp}/p.png"],
     "--plot {tmp}/p.png: the same path as --summary"),
    (["--device", "cuda", "bench", "{model}", "--tasks", "{tasks}"], "--device cuda: no CUDA device"),
    (["bench", "{model}", "--tasks", "{tasks}", "--gguf-batch", "0"], "--gguf-batch"),
])
def test_bad_usage_is_one_line_exit_2(random_llama, tmp_path, tasks_file, argv, message):
    argv = [a.format(tmp=tmp_path, tasks=tasks_file, model=random_llama) for a in argv]
    before = tree_hash(tmp_path)
    assert_one_line_error(run_orstack(*argv), 2, message.format(tmp=tmp_path))
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("option", ["-o", "--summary", "--plot"])
def test_an_existing_directory_is_never_replaced_by_an_output(random_llama, tmp_path, tasks_file, option):
    mydir = tmp_path / "mydir"
    mydir.mkdir()
    (mydir / "notes.txt").write_text("the user's own file")
    before = tree_hash(tmp_path)
    result = run_orstack("bench", random_llama, "--tasks", tasks_file, option, mydir)
    assert_one_line_error(result, 2, f"{option} {mydir}", "is a directory")
    assert tree_hash(tmp_path) == before


def test_a_truncated_gguf_is_one_line_naming_the_file(random_llama, tmp_path, tasks_file):
    pytest.importorskip("gguf")
    from orstack.gguf.export import export_gguf
    from orstack.io.checkpoint import load_model

    model, tokenizer = load_model(random_llama)
    whole = tmp_path / "whole.gguf"
    export_gguf(model, tokenizer, whole, "f32", progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    out = tmp_path / "r.jsonl"
    before = tree_hash(tmp_path)
    result = run_orstack("bench", cut, "--tasks", tasks_file, "-o", out)
    assert_one_line_error(result, 2, str(cut), "truncated GGUF file")
    assert tree_hash(tmp_path) == before


def test_prompts_longer_than_the_context_are_refused_or_truncated(random_llama, tmp_path):
    long_prompt = "12+345=357 rev abc=cba " * 40  # ~900 tokens for a 256-token context
    tasks = write_jsonl(tmp_path / "long.jsonl", [TASKS[0], {"id": "long", "prompt": long_prompt, "kind": "text"}])
    out = tmp_path / "r.jsonl"
    result = run_orstack("bench", random_llama, "--tasks", tasks, "-o", out)
    assert_one_line_error(result, 2, "long.jsonl:2: field 'prompt'", "tokens, more than the context", "(256 tokens)",
                          "--truncate-prompts")
    assert not out.exists()

    summary = tmp_path / "s.json"
    result = ok("bench", random_llama, "--tasks", tasks, "--truncate-prompts", "--max-new-tokens", "4", "-o", out,
                "--summary", summary)
    assert "1 prompt(s) truncated from the left to fit its context of 256 tokens" in result.stderr
    assert json.loads(summary.read_text())["models"][0]["truncated_prompts"] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["prompt"] == TASKS[0]["prompt"]
    kept = rows[1]["prompt"]
    assert long_prompt.endswith(kept) and len(kept) < len(long_prompt)
    assert rows[1]["prompt_tokens"] <= 256 - 4 and rows[1]["output_tokens"] >= 1


def test_a_10_mb_prompt_is_refused_before_generating(random_llama, tmp_path):
    import time

    huge = write_jsonl(tmp_path / "huge.jsonl", [{"id": "big", "prompt": "x" * 10_000_000, "kind": "text"}])
    began = time.perf_counter()
    result = run_orstack("bench", random_llama, "--tasks", huge)
    assert_one_line_error(result, 2, "huge.jsonl:1: field 'prompt'", "of 10000000 characters", "(256 tokens)")
    assert time.perf_counter() - began < 60  # tokenizing all of it alone takes longer here


def test_score_mode_scores_outputs_without_a_model(tmp_path):
    rows = [
        {"id": "n1", "kind": "numeric", "answer": "42", "output": "so it is 42", "model": "api", "extra": 1},
        {"id": "n2", "kind": "numeric", "answer": "42", "output": "41", "model": "api"},
        {"id": "e1", "kind": "exact", "answer": "cba", "output": "cba\n", "model": "api"},
        {"id": "k1", "kind": "code", "prompt": "def f(x):\n", "tests": "assert f(2) == 4", "entry_point": "f",
         "output": "    return x * 2\n", "model": "api"},
        {"id": "k2", "kind": "code", "prompt": "def f(x):\n", "tests": "assert f(2) == 4", "entry_point": "f",
         "output": "    while True: pass\n", "model": "api", "timeout": 0.5},
    ]
    scored_path = write_jsonl(tmp_path / "rows.jsonl", rows)
    summary = tmp_path / "s.json"
    result = ok("bench", "--score", scored_path, "--summary", summary, "--code-timeout", "3")
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["correct"] for r in got] == [True, False, True, True, False]
    assert got[0]["extra"] == 1 and got[0]["output"] == "so it is 42"
    assert got[4]["error"].startswith("timeout")
    data = json.loads(summary.read_text())
    assert data["models"][0]["model"] == "api" and data["models"][0]["accuracy"] == pytest.approx(0.6)
    assert data["config"]["code_timeout"] == 3.0
    assert "accuracy" in result.stderr


def test_two_models_side_by_side(random_llama, tmp_path, tasks_file, sample_text_file):
    from orstack.io.manifest import MANIFEST

    child = tmp_path / "child"
    shutil.copytree(random_llama, child)
    (child / MANIFEST).write_text(json.dumps({
        "stage": "prune", "args": {"sparsity": 0.5}, "metrics": {},
        "lineage": [{"stage": "tiny", "path": "tiny", "args": {}, "metrics": {}}]}))
    out, summary, plot = tmp_path / "r.jsonl", tmp_path / "s.json", tmp_path / "p.png"
    result = ok("bench", random_llama, child, "--tasks", tasks_file, "--ppl", sample_text_file, "--ppl-max-length",
                "64", "--max-new-tokens", "4", "-o", out, "--summary", summary, "--plot", plot)
    assert result.stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * len(TASKS) and {r["model"] for r in rows} == {str(random_llama), str(child)}
    # same weights: same outputs and same perplexity, so the deltas are zero
    assert [r["output"] for r in rows[:3]] == [r["output"] for r in rows[3:]]
    data = json.loads(summary.read_text())
    first, second = data["models"]
    assert first["ppl"]["ppl"] == pytest.approx(second["ppl"]["ppl"], rel=1e-9)
    assert first["ppl"]["bits_per_byte"] > 0 and first["accuracy"] == second["accuracy"]
    assert [s["stage"] for s in second["lineage"]] == ["tiny", "prune"] and first["lineage"] == []
    assert "(+0.000)" in result.stderr or "(-0.000)" in result.stderr
    assert "lineage: tiny -> prune" in result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_config_loads_back_into_the_config(random_llama, tmp_path, tasks_file, sample_text_file):
    from orstack.bench import BenchConfig
    from orstack.io.manifest import config_from_args, config_from_manifest

    summary = tmp_path / "s.json"
    ok("--seed", "7", "bench", random_llama, "--tasks", tasks_file, "--ppl", sample_text_file, "--ppl-max-length", "64",
       "--max-new-tokens", "3", "--batch-size", "2", "--limit", "2", "--code-timeout", "2.5", "--code-memory-mb", "256",
       "--truncate-prompts", "--summary", summary)
    data = json.loads(summary.read_text())
    expected = BenchConfig(tasks=str(tasks_file), ppl=[str(sample_text_file)], ppl_max_length=64, max_new_tokens=3,
                           batch_size=2, limit=2, truncate_prompts=True, code_timeout=2.5, code_memory_mb=256, seed=7)
    assert config_from_args(BenchConfig, data["config"]) == expected
    assert config_from_manifest({"config_class": data["config_class"], "args": data["config"]}) == expected


# CLI option -> BenchConfig field, where the names differ; None: not part of the config.
NOT_CONFIG = {"models": None, "score": None, "threads": None, "output": None, "summary": None, "plot": None,
              "force": None,
              "judge_min": None, "judge_rubric": None}  # folded into `judge` (a JudgeConfig) with --judge


def test_cli_defaults_are_the_config_defaults():
    import typer

    from orstack.bench import BenchConfig
    from orstack.cli import app

    command = typer.main.get_command(app).commands["bench"]
    fields = {f.name: f for f in dataclasses.fields(BenchConfig)}
    defaults = {name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for name, f in fields.items()}
    # endpoint models' options are flat on the command, one EndpointOptions in the config
    from orstack.backends.endpoint import EndpointOptions

    endpoint = {f.name: f.default for f in dataclasses.fields(EndpointOptions)}
    seen, seen_endpoint = set(), set()
    for param in command.params:
        if param.name in NOT_CONFIG:
            continue
        if param.name in endpoint:
            assert param.default == endpoint[param.name], param.name
            seen_endpoint.add(param.name)
            continue
        assert param.name in fields, f"option {param.name} is neither a BenchConfig field nor listed in NOT_CONFIG"
        default = param.default
        if param.multiple and default is None:
            default = []
        assert default == defaults[param.name], param.name
        seen.add(param.name)
    assert set(fields) - seen == {"seed", "endpoint"}  # the global --seed (Runtime.seed) fills seed
    assert set(endpoint) - seen_endpoint == {"backoff"}


def test_fail_under_exits_3_and_writes_nothing_unless_forced(random_llama, tmp_path, tasks_file):
    out = tmp_path / "r.jsonl"
    argv = ["bench", random_llama, "--tasks", tasks_file, "--max-new-tokens", "3", "-o", out, "--fail-under", "1.0"]
    result = run_orstack(*argv)
    assert result.returncode == 3 and "below --fail-under" in result.stderr and not out.exists()
    result = run_orstack(*argv, "--force")
    assert result.returncode == 3 and len(out.read_text().splitlines()) == len(TASKS)


def test_speed_and_stdout_rows(random_llama, tmp_path, tasks_file):
    summary = tmp_path / "s.json"
    result = ok("bench", random_llama, "--tasks", tasks_file, "--speed", "--speed-runs", "2", "--limit", "2",
                "--max-new-tokens", "2", "--threads", "1", "--summary", summary)
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a1", "r1"]
    speed = json.loads(summary.read_text())["models"][0]["speed"]
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0 and speed["load_s"] > 0
    assert speed["peak_rss_mb"] > 50 and speed["size_bytes"] > 1_000_000
    assert speed["threads"] == 1  # bench's --threads became the runtime's


def test_gguf_and_hf_side_by_side(random_llama, tmp_path, tasks_file):
    pytest.importorskip("llama_cpp")
    from orstack.gguf import GgufConfig
    from orstack.gguf import run as export
    from orstack.runtime import Runtime

    gguf = tmp_path / "m.gguf"
    export(str(random_llama), gguf, GgufConfig(type="f32", validate=False), Runtime(device="cpu"))
    out, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    result = ok("bench", random_llama, gguf, "--tasks", tasks_file, "--max-new-tokens", "6", "-o", out,
                "--summary", summary)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    hf_rows, gguf_rows = rows[: len(TASKS)], rows[len(TASKS):]
    assert {r["model"] for r in gguf_rows} == {str(gguf)}
    assert [r["output"] for r in hf_rows] == [r["output"] for r in gguf_rows]
    for a, b in zip(hf_rows[:2], gguf_rows[:2]):
        assert b["mean_logprob"] == pytest.approx(a["mean_logprob"], abs=1e-3)
    models = json.loads(summary.read_text())["models"]
    assert models[1]["size_mb"] == pytest.approx(gguf.stat().st_size / 1e6)
    assert [s["stage"] for s in models[1]["lineage"]] == ["gguf"]  # read from the file's metadata
    assert f"{gguf} lineage: gguf" in result.stderr
    # --gguf-batch: llama.cpp decodes the prompts together (F32 weights: the same answers)
    batched = tmp_path / "b.jsonl"
    ok("bench", gguf, "--tasks", tasks_file, "--max-new-tokens", "6", "--gguf-batch", "3", "-o", batched)
    assert [json.loads(line)["output"] for line in batched.read_text().splitlines()] == [r["output"] for r in gguf_rows]


def test_tasks_from_stdin_and_both_perplexity_rules(random_llama, tmp_path, sample_text_file):
    payload = "".join(json.dumps(t) + "\n" for t in TASKS[:2])
    summary = tmp_path / "s.json"
    result = run_orstack("bench", random_llama, "--tasks", "-", "--max-new-tokens", "2", "--ppl", sample_text_file,
                         "--ppl-rule", "llama.cpp", "--ppl-max-length", "32", "--summary", summary, stdin=payload)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a1", "r1"]
    ppl = json.loads(summary.read_text())["models"][0]["ppl"]
    assert ppl["rule"] == "llama.cpp" and ppl["ppl"] > 1 and ppl["bits_per_byte"] > 0
    # a text shorter than one llama.cpp chunk is bad input, not a crash
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    result = run_orstack("bench", random_llama, "--ppl", short, "--ppl-rule", "llama.cpp", "--ppl-max-length", "64")
    assert_one_line_error(result, 2, "too short")
