"""The `cmd:` JSONL protocol: rows as JSONL on a program's stdin, JSONL rows back on its stdout.

`cmd:` teachers (distill generate) and `cmd:` rewards (rl) speak it. The command runs
through the shell (so pipes and arguments work as typed) in its own process group, and
the whole group is killed when the command is done, times out, fails, or when orstack
is interrupted (Ctrl-C, SIGTERM): nothing it started outlives the call.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from orstack.errors import BadInput
from orstack.io.jsonl import dumps


def check_command(spec: str, command: str) -> None:
    """The program of a cmd: teacher/reward must exist (a typo is bad input, not a late failure);
    `spec` names it in the message (`--teacher cmd:...`)."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise BadInput(f"{spec}: cannot parse the command ({e})") from None
    program = argv[0] if argv else ""
    if "/" in program:
        if not Path(program).exists():
            raise BadInput(f"{spec}: no such program '{program}'")
    elif shutil.which(program) is None and program not in _SHELL_BUILTINS:
        raise BadInput(f"{spec}: program '{program}' not found on PATH")


_SHELL_BUILTINS = {"cat", "echo", "printf", "exec", "env", "true", "false"}


class CommandError(RuntimeError):
    """The command timed out, exited with an error, or wrote something that is not JSONL rows."""


def run_jsonl_command(command: str, rows: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run `command` with `rows` as JSONL on stdin; its stdout parsed as JSONL rows."""
    payload = "".join(dumps(r) + "\n" for r in rows)
    proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: S602
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", start_new_session=True)
    try:
        stdout, stderr = proc.communicate(payload, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CommandError(f"timed out after {timeout:g} s") from None
    finally:
        _kill_group(proc)
    if proc.returncode != 0:
        tail = (stderr or "").strip().splitlines()
        raise CommandError(f"exited with status {proc.returncode}" + (f": {tail[-1][:200]}" if tail else ""))
    return _parse_rows(stdout)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the command's process group (its children included) and reap the command."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # every process of the group has exited already
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    proc.wait()


def _parse_rows(stdout: str) -> list[dict[str, Any]]:
    out = []
    for lineno, line in enumerate(stdout.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CommandError(f"stdout line {lineno} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CommandError(f"stdout line {lineno} is not a JSON object")
        out.append(row)
    return out
