"""Running untrusted programs (model-written code) outside the calling process.

A reusable pool of worker processes (fresh interpreters, so they carry no torch state, each in
its own session, so a Ctrl-C at the terminal reaches only orstack) each run one program at a
time in a freshly forked child:
- the child gets its own session (so the whole process group can be killed), a throw-away
  working directory, RLIMIT_AS (memory), RLIMIT_CPU and RLIMIT_FSIZE, and closed stdin, and
  dies with its worker (PR_SET_PDEATHSIG);
- the network is cut by moving the child into an empty network namespace (unshare
  CLONE_NEWNET; as non-root, with a user namespace first) when the kernel allows it;
- writes outside the working directory are refused by a Landlock ruleset when the kernel
  has Landlock (reads stay allowed, so the standard library imports);
- the worker waits on a pidfd with the wall-clock timeout and SIGKILLs the process group
  on expiry or when the program ends (stray background children die with it);
- closing the pool on an error or an interrupt (`Sandbox.close(kill=True)`, what leaving its
  `with` block by an exception does) sends each worker SIGTERM, on which the worker kills its
  running program's process group and exits; a worker that does not exit is SIGKILLed.
`isolation()` reports which of these the machine supports; nothing is claimed that is
not in force. This is a guard against accidents and runaway programs, not a hardened
jail against a determined attacker (no seccomp filter, shared PID namespace).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass

# Exit codes the child uses to tell the worker what happened.
PASSED, FAILED, SYNTAX, MEMORY = 0, 1, 2, 3
STATUS_BY_CODE = {PASSED: "passed", FAILED: "failed", SYNTAX: "syntax_error", MEMORY: "memory"}

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds per program
    memory_mb: int = 512  # address space
    network: bool = False  # allow network access
    output_mb: int = 16  # largest file the program may write (stdout/stderr included)


@dataclass
class RunResult:
    status: str  # passed | failed | syntax_error | timeout | memory | crashed
    detail: str  # last line of the program's stderr, or what stopped it
    duration_ms: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# -- the child: confine, then run ------------------------------------------------------------
@functools.cache
def _libc() -> ctypes.CDLL:
    """Loaded once per worker; forked children inherit it."""
    return ctypes.CDLL(None, use_errno=True)


_empty_netns: int | None = None  # fd of an empty network namespace this process made once


def _cut_network(libc: ctypes.CDLL) -> bool:
    """Move this process into an empty network namespace (only loopback, down)."""
    if _empty_netns is not None and libc.setns(_empty_netns, CLONE_NEWNET) == 0:
        return True  # joining one is much cheaper than creating (and tearing down) one per program
    if libc.unshare(CLONE_NEWNET) == 0:
        return True
    return libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def _make_empty_netns() -> None:
    """Create one empty network namespace for every program this worker runs (needs the right
    to setns, i.e. root; otherwise each program unshares its own)."""
    global _empty_netns
    libc = _libc()
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)
        ok = libc.unshare(CLONE_NEWNET) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.read(done_r, 1)  # stay alive until the parent holds the namespace
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) == b"1":
            _empty_netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_abi(libc: ctypes.CDLL) -> int:
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(abi, 0)


def _write_rights(abi: int) -> int:
    # WRITE_FILE, REMOVE_DIR, REMOVE_FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM (bits 1, 4-12),
    # REFER from ABI 2, TRUNCATE from ABI 3.
    rights = (1 << 1) | sum(1 << b for b in range(4, 13))
    if abi >= 2:
        rights |= 1 << 13
    if abi >= 3:
        rights |= 1 << 14
    return rights


def _confine_writes(libc: ctypes.CDLL, workdir: str, network: bool = True) -> bool:
    """Landlock: every kind of write is refused except beneath `workdir` (and /dev/null);
    from ABI 4 TCP bind/connect too unless `network`; from ABI 6 signals to processes
    outside the sandbox (the worker that runs it) as well."""
    abi = _landlock_abi(libc)
    if abi < 1:
        return False
    rights = _write_rights(abi)
    attr = _RulesetAttr(rights, 0b11 if abi >= 4 and not network else 0, 0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    fd = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return False
    try:
        file_rights = rights & ((1 << 1) | (1 << 14))  # only file rights apply to a file
        for path, allowed in ((workdir, rights), ("/dev/null", file_rights)):
            target = os.open(path, os.O_PATH)
            try:
                rule = _PathBeneath(allowed, target)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, fd, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                                ctypes.c_uint32(0)) != 0:
                    return False
            finally:
                os.close(target)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        return libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, ctypes.c_uint32(0)) == 0
    finally:
        os.close(fd)


def _child(program: str, workdir: str, limits: Limits, worker: int) -> None:
    """Runs in the forked child; never returns."""
    code = FAILED
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker's handler is not the program's
        os.setsid()
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != worker:  # the worker died before the line above
            os._exit(FAILED)
        os.chdir(workdir)
        out = os.open("stdout", os.O_WRONLY | os.O_CREAT, 0o600)
        err = os.open("stderr", os.O_WRONLY | os.O_CREAT, 0o600)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        libc = _libc()
        if not limits.network:
            _cut_network(libc)
        _confine_writes(libc, workdir, limits.network)
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = math.ceil(limits.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        size = limits.output_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        code = _execute(program)
    finally:
        os._exit(code)


def _execute(program: str) -> int:
    try:
        compiled = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError) as e:
        sys.stderr.write(f"{type(e).__name__}: {e}\n")
        sys.stderr.flush()
        return SYNTAX
    try:
        exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 - the point
    except MemoryError:
        sys.stderr.write("MemoryError\n")
        code = MEMORY
    except BaseException as e:  # noqa: BLE001 - SystemExit too: a program may not exit before its tests run
        sys.stderr.write("".join(traceback.format_exception_only(type(e), e))[-2000:])
        code = FAILED
    else:
        code = PASSED
    sys.stdout.flush()
    sys.stderr.flush()
    return code


# -- the worker: fork, wait, kill, clean up ----------------------------------------------------
def run_program(program: str, limits: Limits = Limits()) -> RunResult:  # noqa: B008 - frozen dataclass
    """Run one program in a confined child of this process and wait for it (up to the timeout)."""
    global _running
    workdir = tempfile.mkdtemp(prefix="orstack-sandbox-")
    began = time.perf_counter()
    worker = os.getpid()
    try:
        pid = os.fork()
        if pid == 0:
            _child(program, workdir, limits, worker)
        _running = pid
        status = _wait(pid, limits.timeout)
        duration = (time.perf_counter() - began) * 1000
        return _result(status, workdir, limits, duration)
    finally:
        _running = None
        shutil.rmtree(workdir, ignore_errors=True)


_running: int | None = None  # the program this worker is running (its process group id)


def _terminate(signum: int, frame: object) -> None:
    """The worker's SIGTERM: kill the running program's process group, then unwind (removing
    its working directory) and exit."""
    if _running is not None:
        try:
            os.killpg(_running, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    raise SystemExit(128 + signum)


def _wait(pid: int, timeout: float) -> int | None:
    """The child's wait status, or None when it ran out of time (it is killed either way)."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    try:  # kill the whole session: background children the program left behind too
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, status = os.waitpid(pid, 0)
    return status if ready else None


def _result(status: int | None, workdir: str, limits: Limits, duration: float) -> RunResult:
    if status is None:
        return RunResult("timeout", f"killed after {limits.timeout:g} s", duration)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return RunResult("timeout", "CPU time limit", duration)
        if sig == signal.SIGXFSZ:
            return RunResult("failed", f"output larger than {limits.output_mb} MB", duration)
        return RunResult("crashed", f"killed by {signal.Signals(sig).name}", duration)
    code = os.WEXITSTATUS(status)
    return RunResult(STATUS_BY_CODE.get(code, "crashed"), _last_line(os.path.join(workdir, "stderr")), duration)


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


# -- the pool ----------------------------------------------------------------------------------
class WorkerDied(Exception):
    pass


class _Worker:
    """One `python -m orstack.tasks.sandbox` process, fed programs as JSON lines on stdin.

    A fresh interpreter rather than a multiprocessing child: it carries none of the caller's
    state (torch, threads) and works whatever the caller's __main__ is (stdin, -c, notebooks).
    It leads its own session (process group), so signals meant for orstack's group do not
    reach it half-way through a program; the pool stops it explicitly."""

    def __init__(self) -> None:
        import subprocess

        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "orstack.tasks.sandbox"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True, bufsize=1, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, program: str, limits: Limits) -> RunResult:
        import json
        from dataclasses import asdict

        try:
            self.proc.stdin.write(json.dumps({"program": program, "limits": asdict(limits)}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (OSError, ValueError):  # a broken pipe, or the pool closing under us
            line = ""
        if not line:
            raise WorkerDied
        return RunResult(**json.loads(line))

    def close(self, kill: bool = False) -> None:
        """Stop the worker: let its running program end within its limits, or with `kill`
        (an error or an interrupt) SIGTERM it, which kills the program's process group first."""
        import subprocess

        if self.alive():
            if kill:
                self._signal(signal.SIGTERM)
            else:
                self._close_pipe(self.proc.stdin)
            try:
                self.proc.wait(timeout=5 if kill else 60)  # a running program ends within its own limits
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._close_pipe(self.proc.stdin)
        self._close_pipe(self.proc.stdout)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the worker's own group: its session leader is the worker
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _close_pipe(pipe: object) -> None:
        try:
            pipe.close()  # type: ignore[attr-defined]
        except (OSError, ValueError):  # a broken pipe, or another thread using it right now
            pass


def _serve() -> None:
    """The worker's loop: one JSON job per line in, one JSON result per line out."""
    import json
    from dataclasses import asdict

    signal.signal(signal.SIGTERM, _terminate)
    _make_empty_netns()
    _libc()
    for line in sys.stdin:
        job = json.loads(line)
        result = run_program(job["program"], Limits(**job["limits"]))
        sys.stdout.write(json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()


class Sandbox:
    """A reusable pool of worker processes; use as a context manager or call close()."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits()) -> None:  # noqa: B008
        import queue
        from concurrent.futures import ThreadPoolExecutor

        self.limits = limits
        self.workers = workers or max(2, os.cpu_count() or 1)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all = [_Worker() for _ in range(self.workers)]
        for worker in self._all:
            self._idle.put(worker)
        self._threads = ThreadPoolExecutor(self.workers)
        self._closed = False

    def run(self, program: str, limits: Limits | None = None) -> RunResult:
        return self.run_many([program], limits)[0]

    def run_many(self, programs: Iterable[str], limits: Limits | None = None) -> list[RunResult]:
        """Run programs in parallel across the pool; results in input order."""
        job_limits = limits or self.limits
        return list(self._threads.map(lambda p: self._dispatch(p, job_limits), programs))

    def worker_pids(self) -> list[int]:
        """The process ids of the pool's workers (each the leader of its own process group)."""
        return [w.pid for w in self._all]

    def _dispatch(self, program: str, limits: Limits) -> RunResult:
        worker = self._idle.get()
        if not worker.alive() and not self._closed:  # died while idle (killed from outside)
            worker = self._replace(worker)
        try:
            return worker.run(program, limits)
        except WorkerDied:
            if self._closed:
                return RunResult("crashed", "the sandbox was closed", 0.0)
            # The program got past the confinement and killed its worker: replace the worker.
            worker = self._replace(worker)
            return RunResult("crashed", "the program killed its sandbox worker", 0.0)
        finally:
            self._idle.put(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.close(kill=True)
        fresh = _Worker()
        self._all[self._all.index(worker)] = fresh
        return fresh

    def close(self, kill: bool = False) -> None:
        """Cancel queued programs (Ctrl-C must not wait for them all) and stop the workers:
        running programs end within their limits, or with `kill` are killed at once."""
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        for worker in list(self._all):
            worker.close(kill)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(kill=exc_type is not None)  # an error or an interrupt: nothing waits for results


def isolation() -> dict[str, bool]:
    """Which confinements this machine enforces (tried in a throw-away child)."""
    workdir = tempfile.mkdtemp(prefix="orstack-probe-")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        libc = _libc()
        os.write(write_fd, bytes([_cut_network(libc), _confine_writes(libc, workdir)]))
        os._exit(0)
    os.close(write_fd)
    flags = os.read(read_fd, 2).ljust(2, b"\0")
    os.close(read_fd)
    os.waitpid(pid, 0)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"network_namespace": bool(flags[0]), "landlock_writes": bool(flags[1]),
            "memory_limit": True, "timeout": True, "process_per_program": True}


if __name__ == "__main__":
    _serve()
