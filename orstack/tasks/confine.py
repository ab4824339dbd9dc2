"""Confining one sandboxed program: what it may read, write, reach, signal and become.

sandbox.py runs each program in a child forked from a worker; this module is what that
child does to itself before the program's first line, and what the worker prepares once
(`Jail.prepare`) so that each program pays a few dozen system calls, not a set-up.

Layers, all applied to every program (a step that fails stops the program, reported
`crashed: sandbox: ...`; nothing runs less confined than `Jail.describe()` says):
- environment: an allow-list (PATH, LANG/LC_*, HOME and TMPDIR = its working directory);
  the worker itself is started with an allow-list too, so no secret is in the memory the
  program is forked from.
- files: Landlock (kernel >= 5.13 with the landlock LSM enabled; ABI from
  `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`): read and execute
  beneath the Python it needs (the interpreter, its standard library, the site-packages,
  the system's shared libraries and /usr/bin for child processes), read/write beneath its
  own working directory and /dev/null, nothing else. From ABI 4 TCP bind/connect is refused
  too; from ABI 6 signals and abstract UNIX sockets are scoped to the program's own domain.
- network: the worker moves into an empty network namespace at start-up; a program given
  Limits(network=True) goes back to the host's (root only).
- processes: the worker makes a PID namespace at start-up whose init is its first child;
  programs are forked into it, so they see and signal no process outside (getppid() is 0),
  and after each program the init kills whatever is left there (kill(-1) reaches only the
  namespace), processes that left the program's session included. RLIMIT_NPROC.
- user: run as root, the program drops to a uid and gid of its worker's own (UID_BASE +
  the worker's pid: no account has one, so nothing on the machine is theirs, and the process
  limit is not shared with other workers or other orstack runs; nobody:nogroup where such a
  uid cannot be set) with no supplementary groups; otherwise the worker sits in a user
  namespace of its own (needed for the PID and network namespaces) and the program's
  capabilities there are cleared.
  PR_SET_NO_NEW_PRIVS always (so no setuid binary can undo any of this).
- limits: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, RLIMIT_CORE 0,
  plus the worker's wall-clock timeout.

Fallback order, chosen once per worker from what the kernel accepts:
1. files: Landlock when `landlock_abi() >= 1` (kernel >= 5.13, landlock in the LSM list);
   else a mount namespace: the worker pivots into a fresh root (a tmpfs holding read-only
   bind mounts of the same paths, and a writable /tmp for the working directories) before
   it runs anything;
2. namespaces: as root directly; as a normal user inside a user namespace of the worker's
   own. Where unprivileged user namespaces are switched off (some distributions' AppArmor
   policy), Landlock alone: files confined, TCP refused from ABI 4, programs run with the
   caller's uid, without PID namespace (a process-group kill) or RLIMIT_NPROC;
3. what cannot be had is listed by `Jail.shortfalls()` — files not confined (no Landlock
   and no user namespaces), network not cut (no namespace and Landlock ABI < 4) — and the
   sandbox refuses to start with any unless told to (`allow_unconfined`); `describe()` is
   the one line that says what is in force.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import resource
import signal
import site
import stat
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orstack.tasks.sandbox import Limits

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
SYS_PIVOT_ROOT = 155
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE, MS_REMOUNT = 1, 2, 4, 4096, 16384, 1 << 18, 32
MNT_DETACH = 2

# Landlock file-system rights (bit numbers from include/uapi/linux/landlock.h)
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # the rights a file rule may hold
NOBODY = 65534
# Far above any account (SSSD's Active Directory ranges end near 2e9) and below the special
# (uid_t)-2 and -1; plus a pid (< 2**22), unique among the workers running at once.
UID_BASE = 0xFF000000

# Read-only beyond the Python installation: shared libraries (extension modules load
# them), the loader's cache, and the usual programs, so a program may start a child process
# (which is confined just the same).
SYSTEM_READ = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/usr/bin", "/bin", "/etc/ld.so.cache",
               "/etc/localtime")
DEVICES = {"/dev/null": FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE, "/dev/zero": FS_READ_FILE,
           "/dev/urandom": FS_READ_FILE, "/dev/random": FS_READ_FILE}
ENV_KEPT = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_NUMERIC", "LC_COLLATE")


class ConfineError(Exception):
    """A confinement step failed: the program must not run."""


@functools.cache
def libc() -> ctypes.CDLL:
    """Loaded once per worker; forked children inherit it."""
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(err)} (errno {err})")
    return result


# -- what the program may see -------------------------------------------------------------------
def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a worker is started with: the allow-list, never the caller's secrets
    (PYTHONHOME and LD_LIBRARY_PATH too, when set: some interpreters do not start without)."""
    env = {"PATH": _path()}
    for name in (*ENV_KEPT, "PYTHONHOME", "LD_LIBRARY_PATH", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.setdefault("LANG", "C.UTF-8")
    return {**env, **(extra or {})}


def _path() -> str:
    """The interpreter's directory first (a program's `python` is the one running it), then the
    system's programs."""
    return os.pathsep.join(dict.fromkeys([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]))


def program_env(workdir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONHOME", "LD_LIBRARY_PATH", *ENV_KEPT)}
    return {**env, "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1"}


def python_paths() -> list[str]:
    """What the Python running this needs to read: the interpreter, its shared library, the
    standard library (with lib-dynload) and the site-packages, venv configuration included.
    Not sys.path as such: a PYTHONPATH entry (orstack's own source tree, say) is the user's
    project, which programs must not read."""
    paths = _link_chain(sys.executable)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.append(sysconfig.get_paths()[key])
    paths += site.getsitepackages() + [os.path.join(p, "lib-dynload") for p in (sysconfig.get_paths()["stdlib"],)]
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        paths.append(site.getusersitepackages())
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and library and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        paths.append(os.path.join(libdir, library))
        paths.append(os.path.realpath(os.path.join(libdir, library)))
    paths.append(os.path.join(sys.prefix, "pyvenv.cfg"))
    paths += [p for p in sys.path if p.endswith(".zip")]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def _link_chain(path: str) -> list[str]:
    """A path and every symlink on the way to its target (each must resolve for the program)."""
    chain = [path]
    while os.path.islink(path) and len(chain) < 40:
        path = os.path.join(os.path.dirname(path), os.readlink(path))
        chain.append(os.path.normpath(path))
    chain.append(os.path.realpath(path))
    return chain


def read_paths() -> list[str]:
    return list(dict.fromkeys(python_paths() + [p for p in SYSTEM_READ if os.path.exists(p)]))


# -- Landlock ------------------------------------------------------------------------------------
class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 without Landlock (old kernel, or LSM disabled)."""
    abi = libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                         ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(abi, 0)


def fs_rights(abi: int) -> int:
    """Every file-system right this ABI knows (all of them handled, so all denied unless a rule
    grants them): bits 0-12 from ABI 1, REFER from 2, TRUNCATE from 3, IOCTL_DEV from 5."""
    bits = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)
    return (1 << bits) - 1


@dataclass
class Jail:
    """What a worker prepares once and applies to each program it forks."""

    files: str  # "landlock" | "mount" (namespace) | "none"
    landlock: int  # the ABI in use (0: none)
    user: str  # "dropped" (root: an unprivileged uid) | "user namespace" | "caller"
    netns: int | None  # the host's network namespace, for Limits(network=True) (root only)
    rules: list[tuple[int, int]] = field(default_factory=list)  # (O_PATH fd, rights) for the Landlock rules
    uid: int = NOBODY
    gid: int = NOBODY
    overlaid: list[str] = field(default_factory=list)  # directories the dropped uid cannot search, covered by a tmpfs
    sys_path: list[str] = field(default_factory=list)  # the import path a program keeps (what it may read)
    init: tuple[int, int, int] | None = None  # the PID namespace's init: (pid, ask fd, done fd)
    namespaces: bool = True  # the worker is in its own network and PID namespaces

    @classmethod
    def prepare(cls, method: str = "auto") -> Jail:
        """Choose and set up the confinement for this worker process (`method`: auto, landlock,
        mount, none); called before the worker makes any working directory. The worker itself
        moves into the empty network namespace and makes the PID namespace its programs are
        forked into (its first child, the namespace's init, sweeps it after each program)."""
        root = os.geteuid() == 0
        abi = landlock_abi()
        if method == "landlock" and abi < 1:
            raise ConfineError("Landlock: not supported by this kernel")
        files = method if method != "auto" else ("landlock" if abi >= 1 else "mount")
        overlaid: list[str] = []
        host_net = None
        drop_to = _own_uid() if root else NOBODY
        blocked = _unsearchable(read_paths(), drop_to, drop_to) if root else []
        mounts = CLONE_NEWNS if files == "mount" or blocked else 0
        if root:
            host_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)  # for Limits(network=True)
            user = "dropped"
            # refused e.g. in a container without CAP_SYS_ADMIN: then Landlock alone, still dropping the uid
            namespaces = libc().unshare(CLONE_NEWNET | CLONE_NEWPID | mounts) == 0
        else:
            uid, gid = os.getuid(), os.getgid()
            # refused where unprivileged user namespaces are switched off: then Landlock alone
            namespaces = libc().unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | mounts) == 0
            if namespaces:
                _map_ids(uid, gid)
            user = "user namespace" if namespaces else "caller"
        if not namespaces:
            if files == "mount" and method == "mount":
                raise ConfineError("mount namespace: refused by this kernel (or container)")
            if blocked:
                raise ConfineError(f"an unprivileged uid cannot reach the Python beneath {', '.join(blocked)}, "
                                   "and no mount namespace can be made to show it just that")
            files = "none" if files == "mount" else files
        if mounts and namespaces:
            _mount("none", "/", None, MS_REC | MS_PRIVATE)
        if files == "mount":
            _pivot_into_minimal_root()
        elif blocked:
            import tempfile

            work = os.path.realpath(tempfile.gettempdir())
            overlaid = _overlay(blocked, read_paths())
            if any(work.startswith(b + "/") for b in blocked):  # a TMPDIR the dropped uid could not enter, now hidden
                tempfile.tempdir = "/tmp"
        jail = cls(files=files, landlock=abi if files == "landlock" else 0, user=user, netns=host_net,
                   overlaid=overlaid, namespaces=namespaces)
        if user == "dropped":
            jail.uid = jail.gid = drop_to
        if namespaces:
            jail._start_init()
        if files == "landlock":
            wanted = [(p, FS_READ) for p in read_paths()] + [(p, r) for p, r in DEVICES.items() if os.path.exists(p)]
            for path, allowed in wanted:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                allowed &= fs_rights(abi) & (~0 if stat.S_ISDIR(os.fstat(fd).st_mode) else FILE_ONLY)
                jail.rules.append((fd, allowed))
            allowed = [os.path.realpath(p) for p in read_paths()]
            jail.sys_path = [p for p in sys.path if p and _beneath_any(os.path.realpath(p), allowed)]
        else:
            jail.sys_path = [p for p in sys.path if p]
        return jail

    def _start_init(self) -> None:
        """The PID namespace's init (this process's first child since the unshare): it keeps the
        namespace alive, reaps what programs orphan, and on each byte from the worker kills
        every other process in the namespace (kill(-1) there reaches only the namespace)."""
        ask_r, ask_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ask_w)
                os.close(done_r)
                set_death_signal()
                os.setsid()
                while os.read(ask_r, 1):
                    # Until none is left: one forked while kill(-1) went through the list is
                    # caught by the next round, and the dead are reaped at once (a zombie still
                    # counts against the program's RLIMIT_NPROC).
                    while True:
                        try:
                            os.kill(-1, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        try:
                            os.waitpid(-1, 0)
                        except ChildProcessError:
                            break
                    os.write(done_w, b"1")
            finally:
                os._exit(0)
        os.close(ask_r)
        os.close(done_w)
        for fd in (ask_w, done_r):
            os.set_inheritable(fd, False)
        self.init = (pid, ask_w, done_r)

    def sweep(self) -> None:
        """After a program: kill whatever it left running in the PID namespace, even processes
        that left its process group (setsid)."""
        if self.init is None:
            return
        pid, ask, done = self.init
        try:  # the program is reaped, so whatever it left is the init's now: nothing there, no sweep
            with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
                if not f.read().strip():
                    return
        except OSError:  # no CONFIG_PROC_CHILDREN: sweep every time
            pass
        os.write(ask, b"1")
        if not os.read(done, 1):
            raise ConfineError("the PID namespace's init died")

    def describe(self) -> str:
        """One line: the confinement in force for every program of this worker."""
        if self.files == "landlock":
            files = f"Landlock ABI {self.landlock} (Python read-only, own dir read/write"
            files += f"; {' and '.join(self.overlaid)} hidden)" if self.overlaid else ")"
        elif self.files == "mount":
            files = "mount namespace (minimal read-only root, own dir read/write)"
        else:
            files = "files NOT CONFINED"
        unprivileged = "uid nobody" if self.uid == NOBODY else "unprivileged uid of its own"
        user = {"dropped": unprivileged, "user namespace": "user namespace, no capabilities",
                "caller": "the caller's uid"}[self.user]
        if self.namespaces:
            network = "no network (netns" + (" + Landlock TCP)" if self.landlock >= 4 else ")")
            pids = "PID namespace"
        else:
            network = "TCP refused by Landlock (no netns)" if self.landlock >= 4 else "network NOT cut"
            pids = "process group (no PID namespace)"
        processes = "processes, " if self.namespaces else ""
        return (f"{files}; {user}; {network}; {pids}; env allow-list; "
                f"limits: time, CPU, memory, {processes}file size, open files")

    def shortfalls(self) -> list[str]:
        """What this machine cannot give that the sandbox promises (Sandbox refuses to start
        with any, unless told to run unconfined)."""
        missing = []
        if self.files == "none":
            missing.append("files are not confined (no Landlock, no user namespaces)")
        if not self.namespaces and self.landlock < 4:
            missing.append("the network is not cut (no network namespace, Landlock ABI < 4)")
        return missing

    # -- in the forked child ----------------------------------------------------------------------
    def enter(self, workdir: str, limits: Limits) -> None:
        """In the forked child, first: the worker's network namespace is empty; a program
        allowed the network goes back to the host's (root only). In the mount fallback the
        program gets a mount namespace of its own in which only its directory is writable."""
        if limits.network and self.namespaces:
            if self.netns is None:
                raise ConfineError("network=True: only when orstack runs as root")
            _check(libc().setns(self.netns, CLONE_NEWNET), "setns(host network)")
        if self.files == "mount":
            _check(libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _mount(workdir, workdir, None, MS_BIND)
            _mount("none", "/tmp", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.chdir(workdir)  # into the writable mount just made on top of it

    def confine(self, workdir: str, limits: Limits) -> None:
        """In the program's own process, last thing before its code: everything else."""
        os.environ.clear()
        os.environ.update(program_env(workdir))
        sys.path[:] = self.sys_path
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = math.ceil(limits.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        size = limits.output_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        if self.user == "dropped":
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        _check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        if self.files == "landlock":
            self._landlock(workdir, limits.network)
        if self.user == "dropped":
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
            if os.getuid() != self.uid or os.geteuid() != self.uid:
                raise ConfineError("the uid drop did not hold")
        elif self.user == "user namespace":
            _clear_capabilities()
            # The user namespace keeps no count of its own before the first fork; set it after.
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        # Nothing the worker holds stays open: the namespace init's pipes, the host's network
        # namespace, the Landlock rules' directories (stdin, stdout and stderr are the program's).
        os.closerange(3, 1 << 16)

    def _landlock(self, workdir: str, network: bool) -> None:
        rights = fs_rights(self.landlock)
        attr = _RulesetAttr(rights, 0b11 if self.landlock >= 4 and not network else 0,
                            0b11 if self.landlock >= 6 else 0)
        size = 8 if self.landlock < 4 else (16 if self.landlock < 6 else 24)
        c = libc()
        fd = _check(c.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                              ctypes.c_uint32(0)), "landlock_create_ruleset")
        own = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
        try:
            for target, allowed in [*self.rules, (own, rights)]:  # rights fitted to each target in prepare()
                rule = _PathBeneath(allowed, target)
                _check(c.syscall(SYS_LANDLOCK_ADD_RULE, fd, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                                 ctypes.c_uint32(0)), "landlock_add_rule")
            _check(c.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, ctypes.c_uint32(0)), "landlock_restrict_self")
        finally:
            os.close(own)
            os.close(fd)


def _beneath_any(path: str, allowed: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in allowed)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _clear_capabilities() -> None:
    """A process in a new user namespace holds every capability there; the program needs none."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(libc().capset(ctypes.byref(header), data), "capset")


def _map_ids(uid: int, gid: int) -> None:
    """In a fresh user namespace: the caller's uid and gid map to themselves, nothing else."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    c = libc()
    _check(c.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                   data.encode() if data else None), f"mount {source} on {target}")


def _own_uid() -> int:
    """UID_BASE + this worker's pid, if this kernel (or container's uid map) lets root become
    it; otherwise nobody's."""
    uid = UID_BASE + os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a forked child reports by exit code only
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return uid if status == 0 else NOBODY


def _may_search(st: os.stat_result, uid: int, gid: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _unsearchable(paths: list[str], uid: int, gid: int) -> list[str]:
    """The outermost directories on the way to `paths` that uid:gid may not enter (a Python
    installed under /root, say)."""
    blocked: set[str] = set()
    for path in paths:
        parts = os.path.abspath(path).split("/")[1:-1]
        for i in range(1, len(parts) + 1):
            ancestor = "/" + "/".join(parts[:i])
            if ancestor in blocked:
                break
            if not _may_search(os.stat(ancestor), uid, gid):
                blocked.add(ancestor)
                break
    return sorted(blocked)


def _overlay(blocked: list[str], paths: list[str]) -> list[str]:
    """Make `paths` reachable for the dropped uid without opening the directories that block
    them: each blocked directory (in this worker's mount namespace only) is covered by a tmpfs
    holding read-only bind mounts of just the paths beneath it, so the rest of it (the
    user's home) is not even there. The caller is in a mount namespace of its own."""
    for top in blocked:
        inside = sorted(p for p in paths if p.startswith(top + "/"))
        inside = [p for p in inside if not any(p.startswith(q + "/") for q in inside if q != p)]
        held = {p: os.open(p, os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if os.path.islink(p) else 0))
                for p in inside}
        try:
            _mount("orstack-sandbox", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
            for path, fd in held.items():
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                    os.symlink(_readlink_at(fd), path)
                    continue
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.makedirs(path, mode=0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                    open(path, "a").close()
                _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                flags = os.statvfs(path).f_flag
                kept = flags & (MS_NOSUID | MS_NODEV | 8)
                _mount("none", path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept)
        finally:
            for fd in held.values():
                os.close(fd)
    return blocked


def _readlink_at(fd: int) -> str:
    """The target of a symlink held by an O_PATH | O_NOFOLLOW descriptor (readlinkat with "")."""
    buf = ctypes.create_string_buffer(4096)
    n = _check(libc().readlinkat(fd, b"", buf, 4096), "readlinkat")
    return buf.raw[:n].decode()


def _pivot_into_minimal_root() -> None:
    """The mount-namespace fallback: a tmpfs root holding read-only bind mounts of what
    Python needs and a writable /tmp, the old root detached. The caller is already in a
    mount namespace of its own."""
    import tempfile

    new_root = tempfile.mkdtemp(prefix="orstack-root-")  # a tmpfs over it, in this namespace only
    _mount("orstack-sandbox", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=256m")
    for path in read_paths() + [p for p in DEVICES if os.path.exists(p)]:
        target = new_root + path
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        _mount(path, target, None, MS_BIND | MS_REC)
        if path not in DEVICES:
            # a remount must repeat the flags the source mount is locked with (in a user namespace)
            flags = os.statvfs(path).f_flag
            kept = flags & (MS_NOSUID | MS_NODEV | 8 | 1024 | 2048) | ((1 << 21) if flags & 4096 else 0)
            _mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept)
    # The working directories' own file system: each program gets it read-only but for its
    # own directory (enter()); 0711, so that the program reaches its directory but lists nothing.
    work = new_root + "/tmp"
    os.makedirs(work, exist_ok=True)
    _mount("orstack-sandbox-tmp", work, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0711,size=256m")
    old = new_root + "/.old-root"
    os.makedirs(old, exist_ok=True)
    _check(libc().syscall(SYS_PIVOT_ROOT, new_root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(libc().umount2(b"/.old-root", MNT_DETACH), "umount the old root")
    os.rmdir("/.old-root")
    _mount("none", "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.environ["TMPDIR"] = "/tmp"
    tempfile.tempdir = "/tmp"


def set_death_signal() -> None:
    """Die with the parent (the worker, or the program's reaper)."""
    _check(libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
