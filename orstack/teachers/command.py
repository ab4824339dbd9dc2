"""`cmd:COMMAND` teachers: Task JSONL on stdin, JSONL rows with `response` on stdout.

The command runs through the shell (so pipes and arguments work as typed), once per
`answer()` call with all of that call's rows; `--timeout` bounds each invocation.
Output rows are matched to input rows by `id` when they carry one, else by order.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from orstack.io.jsonl import dumps
from orstack.teachers.base import Teacher, TeacherOptions, check_command


def run_jsonl_command(command: str, rows: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run `command` with `rows` as JSONL on stdin; its stdout parsed as JSONL (RuntimeError on failure)."""
    payload = "".join(dumps(r) + "\n" for r in rows)
    try:
        done = subprocess.run(command, shell=True, input=payload, capture_output=True, text=True,  # noqa: S602
                              timeout=timeout, encoding="utf-8")
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()
        raise RuntimeError(f"exited with status {done.returncode}" + (f": {tail[-1][:200]}" if tail else ""))
    out = []
    for lineno, line in enumerate(done.stdout.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"stdout line {lineno} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise RuntimeError(f"stdout line {lineno} is not a JSON object")
        out.append(row)
    return out


def match_rows(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Output row for each input row: by `id` when outputs carry ids, else by position."""
    if outputs and all("id" in o for o in outputs):
        by_id = {str(o["id"]): o for o in outputs}
        return [by_id.get(str(r.get("id"))) for r in inputs]
    if len(outputs) != len(inputs):
        raise RuntimeError(f"wrote {len(outputs)} rows for {len(inputs)} inputs and no 'id' fields to match them")
    return list(outputs)


class CommandTeacher(Teacher):
    kind = "cmd"

    def __init__(self, spec: str, options: TeacherOptions, command: str) -> None:
        super().__init__(spec, options)
        self.command = command

    def check(self) -> None:
        check_command(f"--teacher {self.spec}", self.command)

    def answer(self, tasks: list[dict[str, Any]]) -> list[str | None]:
        if not tasks:
            return []
        self.requests += 1
        try:
            matched = match_rows(tasks, run_jsonl_command(self.command, tasks, self.options.timeout))
        except RuntimeError as e:
            self._failed(str(e), len(tasks))
            return [None] * len(tasks)
        responses: list[str | None] = []
        for row in matched:
            response = None if row is None else row.get("response")
            if response is None:
                self._failed("a row came back without 'response'")
            responses.append(None if response is None else str(response))
        return responses
