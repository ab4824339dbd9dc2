"""`orstack bench` end to end: bad input, --score, several models, gates, summary and plot."""

from __future__ import annotations

import json
import shutil

import pytest

from orstack.cli import main

TASKS = [
    {"id": "a1", "prompt": "12+345=", "answer": "357", "kind": "numeric", "family": "add", "level": 1},
    {"id": "r1", "prompt": "rev abc=", "answer": "cba", "kind": "exact", "family": "reverse", "level": 1},
    {"id": "c1", "prompt": "cmp 17 9=", "choices": [">", "<"], "answer": 0, "kind": "choice", "family": "compare"},
]


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def run_ok(argv, capsys):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    captured = capsys.readouterr()
    return captured.out, captured.err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tasks_file(tmp_path):
    return write_jsonl(tmp_path / "tasks.jsonl", TASKS)


@pytest.mark.parametrize(("lines", "message"), [
    (['{"id": "a", "prompt": "p", "kind": "exact", "answer": "x"}', '{"id": "b", "prompt": '],
     "tasks.jsonl:2: not valid JSON"),
    (['{"id": "a", "prompt": "p", "kind": "exact"}'], "tasks.jsonl:1: missing required field 'answer'"),
    (['{"id": "a", "kind": "exact", "answer": "x"}'], "tasks.jsonl:1: missing required field 'prompt'"),
    (['{"id": "a", "prompt": "p", "kind": "poem", "answer": "x"}'], "tasks.jsonl:1: field 'kind': unknown kind"),
])
def test_bad_task_files(random_llama, tmp_path, capsys, lines, message):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = run(["bench", str(random_llama), "--tasks", str(tasks), "-o", str(out)], capsys)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "{tmp}/missing-model", "--tasks", "{tasks}"], "no such checkpoint"),
    (["bench", "{tmp}", "--tasks", "{tasks}"], "not a checkpoint directory"),
    (["bench", "{tmp}/m.gguf", "--tasks", "{tasks}"], "no such GGUF file"),
    (["bench", "{model}", "--tasks", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    (["bench", "{model}"], "nothing to measure"),
    (["bench", "--tasks", "{tasks}"], "no MODEL given"),
    (["bench", "{model}", "--ppl", "{tasks}", "--ppl-rule", "exact"], "--ppl-rule"),
    (["bench", "{model}", "--tasks", "{tasks}", "-o", "{tmp}/no/such/dir/out.jsonl"], "does not exist"),
    (["bench", "{model}", "--score", "{tasks}"], "--score scores existing outputs"),
    (["bench", "--score", "{tasks}"], "missing required field 'output'"),
    (["bench", "{model}", "--ppl", "{tasks}", "--fail-under", "0.5"], "--fail-under needs"),
    (["bench", "{model}", "--tasks", "{tasks}", "--fail-under", "1.5"], "--fail-under"),
    (["bench", "{model}", "--ppl", "{tasks}", "--plot", "{tmp}/p.png"], "--plot needs --tasks"),
])
def test_bad_usage_is_one_line_exit_2(random_llama, tmp_path, tasks_file, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, tasks=tasks_file, model=random_llama) for a in argv]
    code, stdout, stderr = run(argv, capsys)
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert stdout == ""


def test_score_mode_scores_outputs_without_a_model(tmp_path, capsys):
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
    stdout, stderr = run_ok(["bench", "--score", str(scored_path), "--summary", str(summary)], capsys)
    got = [json.loads(line) for line in stdout.splitlines()]
    assert [r["correct"] for r in got] == [True, False, True, True, False]
    assert got[0]["extra"] == 1 and got[0]["output"] == "so it is 42"
    assert got[4]["error"].startswith("timeout")
    data = json.loads(summary.read_text())
    assert data["models"][0]["model"] == "api" and data["models"][0]["accuracy"] == pytest.approx(0.6)
    assert "accuracy" in stderr


def test_two_models_side_by_side(random_llama, tmp_path, tasks_file, sample_text_file, capsys):
    from orstack.io.manifest import MANIFEST

    child = tmp_path / "child"
    shutil.copytree(random_llama, child)
    (child / MANIFEST).write_text(json.dumps({
        "stage": "prune", "args": {"sparsity": 0.5}, "metrics": {},
        "lineage": [{"stage": "tiny", "path": "tiny", "args": {}, "metrics": {}}]}))
    out, summary, plot = tmp_path / "r.jsonl", tmp_path / "s.json", tmp_path / "p.png"
    stdout, stderr = run_ok(["bench", str(random_llama), str(child), "--tasks", str(tasks_file), "--ppl",
                             str(sample_text_file), "--ppl-max-length", "64", "--max-new-tokens", "4", "-o", str(out),
                             "--summary", str(summary), "--plot", str(plot)], capsys)
    assert stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * len(TASKS) and {r["model"] for r in rows} == {str(random_llama), str(child)}
    # same weights: same outputs and same perplexity, so the deltas are zero
    assert [r["output"] for r in rows[:3]] == [r["output"] for r in rows[3:]]
    data = json.loads(summary.read_text())
    first, second = data["models"]
    assert first["ppl"]["ppl"] == pytest.approx(second["ppl"]["ppl"], rel=1e-9)
    assert first["ppl"]["bits_per_byte"] > 0 and first["accuracy"] == second["accuracy"]
    assert [s["stage"] for s in second["lineage"]] == ["tiny", "prune"] and first["lineage"] == []
    assert "(+0.000)" in stderr or "(-0.000)" in stderr
    assert "lineage: tiny -> prune" in stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fail_under_exits_3_and_writes_nothing_unless_forced(random_llama, tmp_path, tasks_file, capsys):
    out = tmp_path / "r.jsonl"
    argv = ["bench", str(random_llama), "--tasks", str(tasks_file), "--max-new-tokens", "3", "-o", str(out),
            "--fail-under", "1.0"]
    code, _, stderr = run(argv, capsys)
    assert code == 3 and "below --fail-under" in stderr and not out.exists()
    code, _, _ = run([*argv, "--force"], capsys)
    assert code == 3 and len(out.read_text().splitlines()) == len(TASKS)


def test_speed_and_stdout_rows(random_llama, tmp_path, tasks_file, capsys):
    summary = tmp_path / "s.json"
    stdout, _ = run_ok(["bench", str(random_llama), "--tasks", str(tasks_file), "--speed", "--speed-runs", "2",
                        "--limit", "2", "--max-new-tokens", "2", "--summary", str(summary)], capsys)
    assert [json.loads(line)["id"] for line in stdout.splitlines()] == ["a1", "r1"]
    speed = json.loads(summary.read_text())["models"][0]["speed"]
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0 and speed["load_s"] > 0
    assert speed["peak_rss_mb"] > 50 and speed["size_bytes"] > 1_000_000


def test_gguf_and_hf_side_by_side(random_llama, tmp_path, tasks_file, capsys):
    pytest.importorskip("llama_cpp")
    from orstack.gguf.export import export_gguf
    from orstack.io.checkpoint import load_model

    model, tokenizer = load_model(random_llama)
    gguf = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, gguf, "f32", progress=False)
    out, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    run_ok(["bench", str(random_llama), str(gguf), "--tasks", str(tasks_file), "--max-new-tokens", "6",
            "-o", str(out), "--summary", str(summary)], capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    hf_rows, gguf_rows = rows[: len(TASKS)], rows[len(TASKS):]
    assert {r["model"] for r in gguf_rows} == {str(gguf)}
    assert [r["output"] for r in hf_rows] == [r["output"] for r in gguf_rows]
    for a, b in zip(hf_rows[:2], gguf_rows[:2]):
        assert b["mean_logprob"] == pytest.approx(a["mean_logprob"], abs=1e-3)
    sizes = [m["size_mb"] for m in json.loads(summary.read_text())["models"]]
    assert sizes[1] == pytest.approx(gguf.stat().st_size / 1e6)


def test_tasks_from_stdin_and_both_perplexity_rules(random_llama, tmp_path, sample_text_file, capsys, monkeypatch):
    import io
    import sys

    payload = "".join(json.dumps(t) + "\n" for t in TASKS[:2]).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(payload), encoding="utf-8"))
    summary = tmp_path / "s.json"
    stdout, _ = run_ok(["bench", str(random_llama), "--tasks", "-", "--max-new-tokens", "2", "--ppl",
                        str(sample_text_file), "--ppl-rule", "llama.cpp", "--ppl-max-length", "32",
                        "--summary", str(summary)], capsys)
    assert [json.loads(line)["id"] for line in stdout.splitlines()] == ["a1", "r1"]
    ppl = json.loads(summary.read_text())["models"][0]["ppl"]
    assert ppl["rule"] == "llama.cpp" and ppl["ppl"] > 1 and ppl["bits_per_byte"] > 0
    # a text shorter than one llama.cpp chunk is bad input, not a crash
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    code, _, stderr = run(["bench", str(random_llama), "--ppl", str(short), "--ppl-rule", "llama.cpp",
                           "--ppl-max-length", "64"], capsys)
    assert code == 2 and "too short" in stderr
