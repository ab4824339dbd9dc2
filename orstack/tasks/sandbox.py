"""Running untrusted programs (model-written code) outside the calling process.

A reusable pool of worker processes (fresh interpreters started with an allow-listed
environment, so they carry no torch state and none of the caller's secrets, each in its own
session, so a Ctrl-C at the terminal reaches only orstack) each run one program at a time:
- the worker sits in an empty network namespace and a PID namespace of its own (made at
  start-up); it forks each program into them: the child leads its own session, dies with
  its worker (PR_SET_PDEATHSIG), works in a throw-away directory with stdin closed, and sees
  no process outside the namespace; after it ends, the namespace's init kills whatever it
  left running (even processes that left its session);
- the program confines itself before its first line (confine.py: environment allow-list,
  Landlock or a mount namespace for the files, nobody:nogroup when orstack runs as root,
  no_new_privs, RLIMIT_AS/CPU/FSIZE/NOFILE/NPROC); a step that fails stops it (`crashed`);
- the worker waits on a pidfd with the wall-clock timeout and SIGKILLs the process group
  on expiry or when the program ends;
- closing the pool on an error or an interrupt (`Sandbox.close(kill=True)`, what leaving its
  `with` block by an exception does) sends each worker SIGTERM, on which the worker kills its
  running program's process group and exits; a worker that does not exit is SIGKILLed.
Each worker reports at start-up the confinement it enforces (`Sandbox.confinement`, one
line; bench prints it), after applying all of it once to an empty program. A machine that
cannot confine the files or cut the network makes Sandbox() refuse to start unless
`allow_unconfined`.
Not covered: seccomp (the kernel's whole system-call surface is reachable), the names and
metadata of files (stat is not confined by Landlock), pathname UNIX sockets the uid may
connect to (Landlock ABI <= 7), and memory summed over a program's processes.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass

from orstack.tasks import confine

# Exit codes the child uses to tell the worker what happened.
PASSED, FAILED, SYNTAX, MEMORY, CONFINE = 0, 1, 2, 3, 4
STATUS_BY_CODE = {PASSED: "passed", FAILED: "failed", SYNTAX: "syntax_error", MEMORY: "memory", CONFINE: "crashed"}


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot confine programs as required on this machine. Exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds per program
    memory_mb: int = 512  # address space
    network: bool = False  # allow network access
    output_mb: int = 16  # largest file the program may write (stdout/stderr included)
    processes: int = 32  # processes and threads (as nobody: all programs running at once together)
    open_files: int = 128


@dataclass
class RunResult:
    status: str  # passed | failed | syntax_error | timeout | memory | crashed
    detail: str  # last line of the program's stderr, or what stopped it
    duration_ms: float
    worker: int = 0  # the worker process that ran it

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# -- the child: confine, then run ------------------------------------------------------------
def _child(program: str, workdir: str, limits: Limits, worker: int, jail: confine.Jail) -> None:
    """Runs in the forked child (in the worker's PID namespace, whose parent it cannot see);
    never returns."""
    code = FAILED
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker's handler is not the program's
        os.setsid()
        confine.set_death_signal()
        # the worker died before the line above: the parent is then the namespace's init
        if os.getppid() != (0 if jail.namespaces else worker):
            os._exit(FAILED)
        os.chdir(workdir)
        out = os.open("stdout", os.O_WRONLY | os.O_CREAT, 0o600)
        err = os.open("stderr", os.O_WRONLY | os.O_CREAT, 0o600)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (out, err, null):
            os.close(fd)
        try:
            jail.enter(workdir, limits)
            jail.confine(workdir, limits)
        except (confine.ConfineError, OSError) as e:
            os.write(2, f"sandbox: {e}\n".encode())
            code = CONFINE
            return
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
def run_program(program: str, limits: Limits, jail: confine.Jail) -> RunResult:
    """Run one program in a confined child of this process and wait for it (up to the timeout)."""
    global _running
    workdir = tempfile.mkdtemp(prefix="orstack-sandbox-")
    began = time.perf_counter()
    worker = os.getpid()
    try:
        if jail.user == "dropped":
            os.chown(workdir, jail.uid, jail.gid)
        # SIGTERM is held across the fork: arriving in the child before _child resets it, the
        # worker's handler raised inside random's at-fork reseed, where Python prints and ignores it
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            _child(program, workdir, limits, worker, jail)
        _running = pid
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        status = _wait(pid, limits.timeout)
        jail.sweep()
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

    def __init__(self, method: str = "auto") -> None:
        import subprocess

        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = confine.worker_env({"PYTHONPATH": package_root})  # never the caller's environment
        self.proc = subprocess.Popen([sys.executable, "-m", "orstack.tasks.sandbox", method], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True, bufsize=1, start_new_session=True,
                                     close_fds=True)
        self.report: dict = {}

    def ready(self) -> dict:
        """The worker's start-up report: {"confinement": line, "files": ..., "error": ...}."""
        import json

        if not self.report:
            line = self.proc.stdout.readline()
            self.report = json.loads(line) if line else {"error": "the sandbox worker exited at start-up"}
        return self.report

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


def _serve(method: str) -> None:
    """The worker's loop: a start-up report line, then one JSON job per line in, one JSON
    result per line out."""
    import json
    from dataclasses import asdict

    signal.signal(signal.SIGTERM, _terminate)
    os.environ.pop("PYTHONPATH", None)  # orstack is imported; programs' own children need no path to it
    try:
        jail = confine.Jail.prepare(method)
        # Everything applied once to an empty program, so a step this machine refuses is
        # reported now, not as every program crashing.
        probe = run_program("", Limits(), jail)
        error = None if probe.passed else f"{probe.status}: {probe.detail}"
        report = {"confinement": jail.describe(), "files": jail.files, "user": jail.user,
                  "landlock_abi": jail.landlock, "namespaces": jail.namespaces, "shortfalls": jail.shortfalls(),
                  "error": error}
    except (confine.ConfineError, OSError) as e:
        report = {"error": f"sandbox: {e}"}
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    if report["error"]:
        return
    worker = os.getpid()
    for line in sys.stdin:
        job = json.loads(line)
        result = run_program(job["program"], Limits(**job["limits"]), jail)
        result.worker = worker
        sys.stdout.write(json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()


class Sandbox:
    """A reusable pool of worker processes; use as a context manager or call close()."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(),  # noqa: B008
                 method: str = "auto", allow_unconfined: bool = False) -> None:
        """`method`: how files are confined — auto (Landlock, else a mount namespace), landlock,
        mount, or none; a machine that can confine no files refuses to start unless
        `allow_unconfined` (then `confinement` says what is NOT confined)."""
        import queue
        from concurrent.futures import ThreadPoolExecutor

        if method not in ("auto", "landlock", "mount", "none"):
            raise ValueError(f"sandbox method: expected auto, landlock, mount or none, got {method!r}")
        self.limits = limits
        self.method = method
        self.workers = workers or max(2, os.cpu_count() or 1)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all = [_Worker(method) for _ in range(self.workers)]
        self._closed = False
        try:
            reports = [w.ready() for w in self._all]
            problem = next((r["error"] for r in reports if r.get("error")), None)
            if problem is None and reports[0]["shortfalls"] and not allow_unconfined:
                problem = (f"refusing to run model-written code: {'; '.join(reports[0]['shortfalls'])} "
                           "on this machine (docs/bench.md, the code sandbox)")
            if problem:
                raise SandboxUnavailable(problem)
        except BaseException:
            self.close(kill=True)
            raise
        self.report = reports[0]
        self.confinement: str = reports[0]["confinement"]  # one line: what every program runs under
        for worker in self._all:
            self._idle.put(worker)
        self._threads = ThreadPoolExecutor(self.workers)

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
        fresh = _Worker(self.method)
        self._all[self._all.index(worker)] = fresh
        fresh.ready()
        return fresh

    def close(self, kill: bool = False) -> None:
        """Cancel queued programs (Ctrl-C must not wait for them all) and stop the workers:
        running programs end within their limits, or with `kill` are killed at once."""
        self._closed = True
        if hasattr(self, "_threads"):
            self._threads.shutdown(wait=False, cancel_futures=True)
        for worker in list(self._all):
            worker.close(kill)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(kill=exc_type is not None)  # an error or an interrupt: nothing waits for results


def isolation(method: str = "auto") -> dict:
    """What this machine enforces: the start-up report of a one-worker pool (every step
    applied once), with `network_namespace` and `landlock_writes` as before."""
    try:
        with Sandbox(workers=1, method=method, allow_unconfined=True) as pool:
            report = dict(pool.report)
    except SandboxUnavailable as e:
        return {"error": str(e), "network_namespace": False, "landlock_writes": False}
    return {**report, "network_namespace": report["namespaces"], "landlock_writes": report["files"] == "landlock"}


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "auto")
