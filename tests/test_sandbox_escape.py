"""Escape attempts against the code sandbox: each program below is an attack that ends by
asserting it worked. Run outside the sandbox (a plain `python -c` child of this test, with this
test's environment, uid and a fresh working directory) each must SUCCEED, so the attack is
real and the test can fail; run inside it each must FAIL, for the reason given."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from orstack.tasks.sandbox import Limits, Sandbox

SECRET_ENV = "ORSTACK_ESCAPE_TEST_API_KEY"
SECRET = "sk-escape-test-0123456789"
ROOT = Path(__file__).resolve().parents[1]
DENIED = r"PermissionError|Permission denied|Errno 13"
AS_ROOT = os.geteuid() == 0
TMP_NAME = f"orstack-escape-test-{os.getpid()}.txt"

# name: (program, what stops it inside: a regex the result's detail matches)
ATTACKS = {
    "read /etc/passwd": ("assert 'root:' in open('/etc/passwd').read()\n", DENIED),
    "read /etc/shadow": ("assert open('/etc/shadow').read()\n", DENIED),
    # under root the home is covered by a tmpfs in the sandbox: the file is not even there
    "read a file in the user's home": ("assert open({home_file!r}).read() == 'home secret'\n",
                                       f"{DENIED}|FileNotFoundError"),
    "list the user's home": ("import os\nassert {home_name!r} in os.listdir({home!r})\n", f"{DENIED}|AssertionError"),
    "read the task file": ("assert 'hidden answer' in open({task_file!r}).read()\n", DENIED),
    "read a file under the project": ("assert '[project]' in open({project_file!r}).read()\n", DENIED),
    "list the project": ("import os\nassert 'pyproject.toml' in os.listdir({project!r})\n", DENIED),
    "read an env var set in the parent": (f"import os\nassert os.environ.get({SECRET_ENV!r}) == {SECRET!r}\n",
                                          "AssertionError"),
    "find the secret in /proc/self/environ": (
        f"assert {SECRET!r}.encode() in open('/proc/self/environ', 'rb').read()\n", f"{DENIED}|AssertionError"),
    "write outside the work dir": ("open('{outside}/direct.txt', 'w').write('x')\n", DENIED),
    "write to /tmp beside the work dir": ("import os\nopen('/tmp/' + {tmp_name!r}, 'w').write('x')\n"
                                          "assert os.path.exists('/tmp/' + {tmp_name!r})\n",
                                          r"PermissionError|Permission denied|Read-only file system"),
    "write outside via a shell child": (
        "import os, subprocess\n"
        "subprocess.run(['sh', '-c', 'echo ok > here.txt'], check=True)\n"  # the child itself runs
        "assert open('here.txt').read() == 'ok\\n'\n"
        "subprocess.run(['sh', '-c', 'echo x > {outside}/sh.txt'])\n"
        "assert os.path.exists('{outside}/sh.txt')\n", "AssertionError"),
    "write outside via a python child": (
        "import subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', 'open(\"{outside}/py.txt\", \"w\").write(\"x\")'], check=True)\n",
        "CalledProcessError"),
    "connect to 127.0.0.1": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n",
                             r"Errno|unreachable"),
    "run as root": ("import os\nassert os.getuid() == 0 and os.geteuid() == 0\n", "AssertionError"),
    "os.setuid(0) after the drop": ("import os\nos.setuid(0)\nassert os.getuid() == 0\n",
                                    r"PermissionError|Operation not permitted"),
    "become root in a user namespace of its own": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nuid, gid = os.getuid(), os.getgid()\n"
        "assert libc.unshare(0x10000000) == 0, ctypes.get_errno()\n"  # CLONE_NEWUSER: every capability there
        "open('/proc/self/setgroups', 'w').write('deny')\n"
        "open('/proc/self/uid_map', 'w').write(f'0 {{uid}} 1')\nopen('/proc/self/gid_map', 'w').write(f'0 {{gid}} 1')\n"
        "assert os.getuid() == 0 and open('/etc/shadow').read()\n", DENIED),
    "fork bomb (200 processes)": (
        "import os, time\npids = []\nfor _ in range(200):\n    pid = os.fork()\n    if pid == 0:\n"
        "        time.sleep(2)\n        os._exit(0)\n    pids.append(pid)\nfor pid in pids:\n    os.waitpid(pid, 0)\n",
        r"BlockingIOError|Resource temporarily unavailable"),
    "memory bomb (768 MB touched)": ("chunks = [bytearray(64 * 1024 ** 2) for _ in range(12)]\n", "MemoryError"),
    "ptrace the parent and the workers": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "seized = [p for p in {targets} if libc.ptrace(0x4206, p, 0, 0) == 0]\n"  # PTRACE_SEIZE: does not stop it
        "assert seized, ctypes.get_errno()\n", "AssertionError"),
    # the environment orstack (or a worker) was started with: where a user's exported keys are
    "peek at /proc/<parent>/environ": ("assert any(open('/proc/%d/environ' % p, 'rb').read() for p in {targets})\n",
                                       f"{DENIED}|FileNotFoundError|ProcessLookupError"),
    "signal the parent": ("import os\nos.kill({parent}, 0)\n", r"ProcessLookupError|PermissionError"),
}
NEEDS_ROOT = {"read /etc/shadow", "become root in a user namespace of its own", "run as root",
              "os.setuid(0) after the drop", "read a file in the user's home", "list the user's home"}


@pytest.fixture(scope="module")
def scene():
    """The things to attack: a secret in the environment, files in the home, the task file and
    the project, a world-writable directory outside, a listening socket; and the pool, started
    with the secret already exported (as a user's OPENAI_API_KEY would be)."""
    os.environ[SECRET_ENV] = SECRET
    home = Path.home()
    home_file = home / ".orstack-escape-test-secret"
    home_file.write_text("home secret")
    shared = Path(tempfile.mkdtemp(prefix="orstack-escape-"))
    shared.chmod(0o755)  # readable by anyone: only the sandbox stands in the way
    task_file = shared / "tasks.jsonl"
    task_file.write_text(json.dumps({"id": "t", "prompt": "", "answer": "hidden answer"}) + "\n")
    task_file.chmod(0o644)
    outside = shared / "outside"
    outside.mkdir()
    outside.chmod(0o777)  # writable by anyone (nobody too): only the sandbox stands in the way
    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(64)
    pool = Sandbox(workers=2, limits=Limits(timeout=5.0, memory_mb=256))
    fields = {"home_file": str(home_file), "home": str(home), "home_name": home_file.name,
              "task_file": str(task_file), "project_file": str(ROOT / "pyproject.toml"), "project": str(ROOT),
              "outside": str(outside), "tmp_name": TMP_NAME,
              "port": listener.getsockname()[1], "parent": os.getpid(),
              "targets": [os.getpid(), *pool.worker_pids()]}
    try:
        yield pool, fields, outside
    finally:
        pool.close(kill=True)
        listener.close()
        home_file.unlink(missing_ok=True)
        os.environ.pop(SECRET_ENV, None)
        shutil.rmtree(shared, ignore_errors=True)


def _program(name: str, fields: dict) -> str:
    return ATTACKS[name][0].format(**fields)


def _clear(outside: Path) -> None:
    for f in outside.iterdir():
        f.unlink()
    Path("/tmp", TMP_NAME).unlink(missing_ok=True)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_attack_works_outside_the_sandbox(scene, name, tmp_path):
    if name in NEEDS_ROOT and not AS_ROOT:
        pytest.skip("needs orstack to run as root (what the attack exploits)")
    if "ptrace" in name and Path("/proc/sys/kernel/yama/ptrace_scope").exists() and \
            Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() != "0":
        pytest.skip("Yama restricts ptrace to descendants on this machine")
    _, fields, outside = scene
    _clear(outside)
    program = _program(name, fields)
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1000:]
    if "write outside" in name:
        assert any(outside.iterdir())
    _clear(outside)


# In the mount-namespace fallback most of the file system is simply not there.
ABSENT = r"FileNotFoundError|No such file|Read-only file system|AssertionError"


@pytest.mark.parametrize("method", ["auto", "mount"])
def test_every_attack_fails_inside_the_sandbox(scene, method):
    """`auto` is what runs (Landlock here); `mount` the fallback for kernels without it."""
    import re

    pool, fields, outside = scene
    if method != "auto":
        pool = Sandbox(workers=2, limits=pool.limits, method=method)
        fields = {**fields, "targets": [os.getpid(), *pool.worker_pids()]}
    try:
        _clear(outside)
        names = list(ATTACKS)
        results = pool.run_many([_program(n, fields) for n in names])
        got = {n: (r.status, r.detail) for n, r in zip(names, results)}
        escaped = {n: d for n, (status, d) in got.items() if status == "passed"}
        assert escaped == {}, f"escaped the sandbox: {escaped}"
        reason = {n: ATTACKS[n][1] + ("|" + ABSENT if method == "mount" else "") for n in names}
        wrong = {n: got[n] for n in names if not re.search(reason[n], got[n][1])}
        assert wrong == {}, f"stopped, but not by the sandbox: {wrong}"
        assert got["memory bomb (768 MB touched)"][0] == "memory"
        assert list(outside.iterdir()) == [] and not Path("/tmp", TMP_NAME).exists()
        # the pool survived every attack, and still runs programs as before
        assert pool.run("assert 1 + 1 == 2\n").passed
    finally:
        if method != "auto":
            pool.close(kill=True)


def test_the_confinement_is_named_and_what_is_claimed_holds(scene):
    pool, _, _ = scene
    line = pool.confinement
    assert line and "NOT" not in line, line
    if pool.report["files"] == "landlock":
        assert f"Landlock ABI {pool.report['landlock_abi']}" in line
    if AS_ROOT:
        # a uid of the worker's own (no account's, no group), one per worker, or nobody's
        whoami = ("import os, sys\nassert os.getuid() == os.getgid() and not os.getgroups()\n"
                  "print(os.getuid(), file=sys.stderr)\n")
        uids = {r.worker: r.detail for r in pool.run_many([whoami] * 8)}
        assert all(int(uid) in (65534, 0xFF000000 + worker) for worker, uid in uids.items()), uids
        assert ("uid nobody" if set(uids.values()) == {"65534"} else "unprivileged uid of its own") in line
    env = pool.run("import os, sys\nsys.stderr.write(' '.join(sorted(os.environ)))\n")
    assert env.passed and set(env.detail.split()) <= {"PATH", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "LANG",
                                                      "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_NUMERIC",
                                                      "LC_COLLATE", "PYTHONHOME", "LD_LIBRARY_PATH"}
    home = pool.run("import os\nassert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n")
    assert home.passed, home.detail
    # nothing the worker holds (its init's pipes, the host's network namespace, Landlock's
    # directory handles) is left open for the program to use
    fds = pool.run("import os, sys\nopen_fds = []\nfor fd in range(1024):\n    try:\n        os.fstat(fd)\n"
                   "        open_fds.append(fd)\n    except OSError:\n        pass\nsys.stderr.write(repr(open_fds))\n")
    assert fds.passed and fds.detail == "[0, 1, 2]", fds


def test_background_processes_that_leave_the_session_are_killed(scene, tmp_path):
    """A child that calls setsid() escapes a process-group kill; the PID namespace's sweep
    reaches it anyway (it would write into its own, still-existing directory otherwise)."""
    pool, _, _ = scene
    marker = tmp_path / "alive"
    tmp_path.chmod(0o777)
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.5)\n"
               f"    open({str(marker)!r}, 'w')\n    os._exit(0)\n")
    assert pool.run(program).passed
    import time

    time.sleep(2.5)
    assert not marker.exists()


def test_an_unbounded_fork_bomb_is_contained_and_leaves_nothing_behind(scene):
    """Two bombs at once whose children leave the session: stopped at the time limit, and
    every process they made is gone (reaped too: a zombie would still count against the
    process limit), so the next programs fork as usual."""
    pool, _, _ = scene
    bomb = ("import os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "            time.sleep(60)\n    except OSError:\n        time.sleep(0.01)\n")
    assert [r.status for r in pool.run_many([bomb, bomb], Limits(timeout=1.5))] == ["timeout", "timeout"]
    forks = ("import os\npids = []\nfor _ in range(10):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n"
             "    pids.append(pid)\nassert all(os.waitpid(p, 0)[1] == 0 for p in pids)\n")
    assert all(r.passed for r in pool.run_many([forks, forks])), "the bombs' processes still hold the limit"


def test_bench_score_keeps_the_secret_and_the_rows_file_from_the_program(tmp_path):
    """End to end through `orstack bench --score`: the program reads neither its own rows file
    nor the exported key, and the summary names the confinement."""
    rows = tmp_path / "rows.jsonl"
    tests = (f"import os\nassert {SECRET_ENV!r} not in os.environ\n"
             f"try:\n    open({str(rows)!r}).read()\nexcept PermissionError:\n    pass\n"
             "else:\n    raise AssertionError('read the rows file')\n")
    rows.write_text(json.dumps({"id": "k", "kind": "code", "prompt": "", "tests": tests, "output": "",
                                "model": "api"}) + "\n")
    tmp_path.chmod(0o755)
    rows.chmod(0o644)
    out, summary = tmp_path / "scored.jsonl", tmp_path / "summary.json"
    env = dict(os.environ, **{SECRET_ENV: SECRET})
    done = subprocess.run([sys.executable, "-m", "orstack", "bench", "--score", str(rows), "-o", str(out),
                           "--summary", str(summary)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())
    assert row["correct"] is True, row.get("error")
    model = json.loads(summary.read_text())["models"][0]
    assert model["sandbox"] and "NOT" not in model["sandbox"]
    assert "sandbox:" in done.stderr


NORMAL_USER_ATTACKS = ["read /etc/passwd", "read the task file", "read a file under the project",
                       "read an env var set in the parent", "write outside the work dir",
                       "write to /tmp beside the work dir",
                       "write outside via a shell child", "connect to 127.0.0.1", "os.setuid(0) after the drop",
                       "memory bomb (768 MB touched)", "ptrace the parent and the workers", "signal the parent"]


@pytest.mark.skipif(not AS_ROOT or shutil.which("unshare") is None, reason="simulated from root with unshare -U")
@pytest.mark.parametrize(("method", "user_namespaces"), [("auto", True), ("mount", True), ("auto", False)])
def test_as_a_normal_user_the_sandbox_confines_too(scene, method, user_namespaces):
    """orstack run by a normal user: no uid to drop to, so the worker makes a user namespace of
    its own (for the network and PID namespaces) and clears the program's capabilities there.
    Simulated with `unshare -U --map-user=1000`: the pool runs as uid 1000 (root's file access
    on the host stays, so what is refused here is refused by the sandbox). Not covered by the
    simulation: RLIMIT_NPROC, which the kernel does not apply to host root (the fork bomb).
    Without user namespaces (their limit set to none left, in a user namespace of the test's
    own), Landlock alone: the caller's uid, no network or PID namespace."""
    _, fields, outside = scene
    _clear(outside)
    programs = {n: _program(n, fields) for n in NORMAL_USER_ATTACKS}
    script = (
        "import json, os, sys\nfrom orstack.tasks.sandbox import Limits, Sandbox\n"
        "programs = json.loads(sys.stdin.read())\n"
        f"with Sandbox(workers=1, limits=Limits(timeout=5.0, memory_mb=256), method={method!r}) as pool:\n"
        "    targets = repr([os.getpid(), *pool.worker_pids()])\n"
        "    programs = {n: p.replace(repr(TARGETS), targets) for n, p in programs.items()}\n"
        "    results = dict(zip(programs, pool.run_many(list(programs.values()))))\n"
        "    print(json.dumps({'uid': os.getuid(), 'confinement': pool.confinement,\n"
        "                      'results': {n: [r.status, r.detail] for n, r in results.items()}}))\n"
    ).replace("TARGETS", repr(fields["targets"]))
    command = ["unshare", "-U", "--map-user=1000", "--map-group=1000", sys.executable, "-c", script]
    if not user_namespaces:
        command = ["unshare", "-U", "--map-root-user", "sh", "-c",
                   'echo 1 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh", *command]
    done = subprocess.run(command, input=json.dumps(programs), capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no user namespaces here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    expected = "user namespace" if user_namespaces else "the caller's uid; TCP refused by Landlock (no netns)"
    assert report["uid"] == 1000 and expected in report["confinement"], report
    import re

    escaped = {n: r for n, r in report["results"].items() if r[0] == "passed"}
    assert escaped == {}
    also = r"|Invalid argument" + ("|" + ABSENT if method == "mount" else "")
    wrong = {n: r for n, r in report["results"].items() if not re.search(ATTACKS[n][1] + also, r[1])}
    assert wrong == {}, wrong  # setuid(0) there: EINVAL, uid 0 is not mapped
    assert list(outside.iterdir()) == []
