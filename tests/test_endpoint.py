"""Served models under test: `orstack bench http://HOST:PORT/v1#MODEL` against a real
llama_cpp.server on the tiny model's GGUF gives the rows the local backends give; servers that
error, hang, refuse logprobs or are down fail cleanly (exit 2, one line, nothing written) or,
with --keep-going, leave an error on the row; several servers of one model share the load."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_orstack

from orstack.backends.base import open_backend
from orstack.backends.endpoint import EndpointBackend, EndpointOptions, _entropy_lower_bound
from orstack.errors import BadInput
from orstack.runtime import Runtime

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
RUNTIME = Runtime(device="cpu")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_trained, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    from orstack.gguf import GgufConfig, run

    out = tmp_path_factory.mktemp("endpoint") / "tiny-f32.gguf"
    run(str(tiny_trained.model), out, GgufConfig(type="f32", validate=False), RUNTIME)
    return out


@pytest.fixture(scope="module")
def served(tiny_gguf):
    """llama-cpp-python's OpenAI-compatible server on the tiny GGUF, with an F32 KV cache as
    orstack's llama.cpp backend uses (so the logits are the same)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf), "--host",
                             "127.0.0.1", "--port", str(port), "--n_threads", "1", "--type_k", "0", "--type_v", "0",
                             "--n_ctx", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not start")
    yield f"http://127.0.0.1:{port}/v1#tiny"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tasks(tiny_trained, tmp_path_factory) -> Path:
    """Held-out tiny tasks of both generated kinds, and choice tasks (one with the choice
    glued to the prompt, one whose prompt ends in a space that moves onto the choices)."""
    rows = read_jsonl(tiny_trained.tasks / "heldout.jsonl")
    # longer answers too: a repetition penalty (llama-cpp-python's server default) changes them
    picked = [r for r in rows if r["kind"] == "numeric"][:8] + [r for r in rows if r["kind"] == "exact"][:8]
    picked += [r for r in rows if r.get("level", 1) >= 2][:8]
    picked += [{"id": "c1", "prompt": "1+1=", "kind": "choice", "choices": ["2", "3", "8"], "answer": 0,
                "target_delimiter": ""},
               {"id": "c2", "prompt": "2+3= ", "kind": "choice", "choices": ["5", "6"], "answer": 0},
               {"id": "c3", "prompt": "rev ab=", "kind": "choice", "choices": ["ba", "ab"], "answer": 0}]
    return write_jsonl(tmp_path_factory.mktemp("tasks") / "tasks.jsonl", picked)


def bench_rows(tmp_path: Path, model: str, tasks: Path, *extra: str) -> list[dict]:
    out = tmp_path / f"rows-{abs(hash(model))}.jsonl"
    result = run_orstack("bench", model, "--tasks", str(tasks), "--max-new-tokens", "16", "-o", str(out), *extra)
    assert result.returncode == 0, result.stderr
    return read_jsonl(out)


@needs_llama
def test_endpoint_rows_equal_local_rows_for_the_same_weights(served, tiny_gguf, tiny_trained, tasks, tmp_path):
    endpoint = bench_rows(tmp_path, served, tasks, "--concurrency", "3")
    local = bench_rows(tmp_path, str(tiny_gguf), tasks)
    hf = bench_rows(tmp_path, str(tiny_trained.model), tasks)
    assert [r["id"] for r in endpoint] == [r["id"] for r in local]
    assert any(r["correct"] for r in endpoint) and not all(r["correct"] for r in endpoint)  # a real mix
    for e, ll, h in zip(endpoint, local, hf):
        assert e["model"] == served and e["error"] is None
        assert e["output"] == ll["output"] == h["output"], e["id"]
        assert e["correct"] == ll["correct"] == h["correct"] and e["score"] == ll["score"]
        if e["kind"] == "choice":
            assert e["choice_loglikelihoods"] == pytest.approx(ll["choice_loglikelihoods"], abs=1e-4)
            continue
        assert e["prompt_tokens"] == ll["prompt_tokens"]
        # servers do not count or report the token that stopped the answer (EOS or the stop
        # sequence's); the local backends do
        assert e["output_tokens"] in (ll["output_tokens"], ll["output_tokens"] - 1)
        for field in ("mean_logprob", "min_logprob", "mean_entropy"):
            assert isinstance(e[field], float), field


@needs_llama
def test_endpoint_token_logprobs_and_entropy_match_llama_cpp(served, tiny_gguf):
    """Token by token, with no stop in play: the same logprobs; the entropy of the top-20
    alternatives is a lower bound of the full distribution's."""
    prompts = ["12+34=", "rev abc="]
    served_backend = open_backend(served, RUNTIME, endpoint=EndpointOptions(concurrency=2))
    local = open_backend(str(tiny_gguf), RUNTIME)
    try:
        ours = local.generate(prompts, max_new_tokens=6, stop=[])
        theirs = served_backend.generate(prompts, max_new_tokens=6, stop=[])
    finally:
        served_backend.close()
        local.close()
    for o, t in zip(ours, theirs):
        assert t.text == o.text
        n = len(t.token_logprobs)
        assert n >= 1 and t.token_logprobs == pytest.approx(o.token_logprobs[:n], abs=1e-4)
        assert all(te <= oe + 1e-4 for te, oe in zip(t.token_entropies, o.token_entropies))
        assert all(te > 0.5 * oe for te, oe in zip(t.token_entropies, o.token_entropies))


def test_entropy_lower_bound_is_exact_when_the_alternatives_cover_everything():
    import math

    assert _entropy_lower_bound([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    assert _entropy_lower_bound([math.log(0.5)]) == pytest.approx(math.log(2))  # the rest: one outcome
    assert _entropy_lower_bound([0.0]) == 0.0


# -- servers that fail ------------------------------------------------------------------------
class _Stub(BaseHTTPRequestHandler):
    """Legitimate fakes of what real servers do: answer, error, hang, refuse logprobs, not echo."""

    mode = "ok"
    hits = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        with self.lock:
            type(self).hits += 1
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.mode == "error":
            return self._send(500, {"error": "boom"})
        if self.mode == "slow":
            time.sleep(2.0)
            return self._send(500, {"error": "late"})
        if self.mode == "no-logprobs" and body.get("logprobs") is not None:
            return self._send(400, {"error": {"message": "logprobs are not supported"}})
        if self.mode == "ok":
            time.sleep(0.05)  # long enough for requests to overlap
        text = "42" if "prompt" in body else "hi"
        choice = {"text": text} if "prompt" in body else {"message": {"role": "assistant", "content": text}}
        if body.get("logprobs") is not None and "prompt" in body:
            choice["logprobs"] = {"token_logprobs": [-0.5, -0.25], "top_logprobs": [{"4": -0.5}, {"2": -0.25}],
                                  "text_offset": [0, 1], "tokens": ["4", "2"]}
        return self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send(200, {"data": []})

    def log_message(self, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # the client hung up on the slow stub: expected
        pass


@pytest.fixture
def stub():
    servers = []

    def start(mode: str) -> tuple[str, type]:
        handler = type(f"Stub_{mode}", (_Stub,), {"mode": mode, "hits": 0, "lock": threading.Lock()})
        server = _QuietServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", handler

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


GEN_TASKS = [{"id": i, "prompt": f"{i}+{i}=", "kind": "numeric", "answer": str(2 * i)} for i in range(6)]


def test_an_erroring_server_exits_2_with_nothing_written(stub, tmp_path):
    url, handler = stub("error")
    tasks = write_jsonl(tmp_path / "t.jsonl", GEN_TASKS)
    out = tmp_path / "rows.jsonl"
    result = run_orstack("bench", f"{url}#m", "--tasks", str(tasks), "--retries", "1", "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"orstack: error: {url}#m: HTTP 500 from /completions"
    assert not out.exists() and list(tmp_path.iterdir()) == [tasks]
    assert handler.hits >= 2  # retried once


def test_keep_going_leaves_the_error_on_each_row(stub, tmp_path):
    url, handler = stub("error")
    tasks = write_jsonl(tmp_path / "t.jsonl", GEN_TASKS[:3])
    out = tmp_path / "rows.jsonl"
    result = run_orstack("bench", f"{url}#m", "--tasks", str(tasks), "--retries", "1", "--keep-going",
                         "--summary", str(tmp_path / "s.json"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["error"] for r in rows] == ["endpoint: HTTP 500 from /completions"] * 3
    assert all(r["output"] is None and r["correct"] is None and r["score"] is None for r in rows)
    summary = json.loads((tmp_path / "s.json").read_text())["models"][0]
    assert summary["endpoint_errors"] == 3 and summary["scored"] == 0
    assert handler.hits == 6  # each request tried twice


def test_a_server_that_hangs_times_out(stub, tmp_path):
    url, _ = stub("slow")
    tasks = write_jsonl(tmp_path / "t.jsonl", GEN_TASKS[:2])
    began = time.monotonic()
    result = run_orstack("bench", f"{url}#m", "--tasks", str(tasks), "--retries", "0", "--timeout", "0.3",
                         "-o", str(tmp_path / "rows.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"orstack: error: {url}#m: timed out after 0.3 s"
    assert time.monotonic() - began < 1.9  # the first failure ends the run; nothing waits for the server
    assert not (tmp_path / "rows.jsonl").exists()


def test_a_dead_endpoint_is_one_line_exit_2(tmp_path):
    tasks = write_jsonl(tmp_path / "t.jsonl", GEN_TASKS[:1])
    url = f"http://127.0.0.1:{free_port()}/v1#m"
    for extra in ((), ("--keep-going",)):
        result = run_orstack("bench", url, "--tasks", str(tasks), "-o", str(tmp_path / "rows.jsonl"), *extra)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"orstack: error: {url}: cannot reach the server"), result.stderr
        assert not (tmp_path / "rows.jsonl").exists()


def test_bad_endpoint_specs_and_options_are_refused(tmp_path):
    tasks = write_jsonl(tmp_path / "t.jsonl", GEN_TASKS[:1])
    for spec, message in (("http://127.0.0.1:1/v1", "name the model after '#'"),
                          ("http://127.0.0.1:1/v1,ftp://x#m", "'ftp://x' is not an http(s):// URL")):
        result = run_orstack("bench", spec, "--tasks", str(tasks))
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = run_orstack("bench", "http://127.0.0.1:1/v1#m", "--tasks", str(tasks), "--speed")
    assert result.returncode == 2 and "--ppl and --speed need the weights" in result.stderr
    with pytest.raises(BadInput, match="its server applies the model's own template"):
        EndpointBackend("http://127.0.0.1:1/v1#m", chat_template="t.jinja")


def test_a_server_that_refuses_logprobs_still_answers(stub, tmp_path):
    url, _ = stub("no-logprobs")
    tasks = write_jsonl(tmp_path / "t.jsonl", GEN_TASKS[:2])
    rows = bench_rows(tmp_path, f"{url}#m", tasks)
    assert [r["output"] for r in rows] == ["42", "42"]
    assert all(r["mean_logprob"] is None and r["mean_entropy"] is None for r in rows)


def test_choice_tasks_need_echoed_prompt_logprobs(stub, tmp_path):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": 1, "prompt": "1+1=", "kind": "choice",
                                                "choices": ["2", "3"], "answer": 0}])
    for mode, message in (("ok", "did not return prompt log-probabilities (echo with logprobs)"),  # no echo
                          ("no-logprobs", "need the prompt's log-probabilities (echo with logprobs) and the server "
                                          "refused the request (HTTP 400 from /completions: logprobs are not "
                                          "supported)")):
        url, _ = stub(mode)
        result = run_orstack("bench", f"{url}#m", "--tasks", str(tasks), "--keep-going",
                             "-o", str(tmp_path / "rows.jsonl"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "rows.jsonl").exists()


def test_conversations_go_to_chat_completions_with_signal_fields_when_given(stub, tmp_path):
    url, _ = stub("ok")
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "hello"}],
                                                "kind": "exact", "answer": "hi"}])
    rows = bench_rows(tmp_path, f"{url}#m", tasks)
    assert rows[0]["output"] == "hi" and rows[0]["correct"] and rows[0]["messages"][0]["content"] == "hello"


def test_requests_spread_over_several_servers_and_retries_find_a_healthy_one(stub, tmp_path):
    a, hits_a = stub("ok")
    b, hits_b = stub("ok")
    tasks = write_jsonl(tmp_path / "t.jsonl", [{**t, "id": f"{t['id']}-{k}"} for t in GEN_TASKS for k in (0, 1)])
    rows = bench_rows(tmp_path, f"{a},{b}#m", tasks, "--concurrency", "4")
    assert len(rows) == 12 and all(r["output"] == "42" for r in rows)
    assert hits_a.hits + hits_b.hits == 12 and min(hits_a.hits, hits_b.hits) >= 4
    bad, hits_bad = stub("error")
    rows = bench_rows(tmp_path, f"{bad},{a}#m", write_jsonl(tmp_path / "u.jsonl", GEN_TASKS), "--concurrency", "1",
                      "--retries", "1")
    assert all(r["output"] == "42" and r["error"] is None for r in rows)
    assert hits_bad.hits >= 1
