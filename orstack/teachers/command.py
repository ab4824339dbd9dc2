"""`cmd:COMMAND` teachers: Task JSONL on stdin, JSONL rows with `response` on stdout.

The command runs once per `answer()` call with all of that call's rows, through
orstack/io/command.py (the shell, its own process group, killed with everything it started
when it is done, times out or orstack is interrupted); `--timeout` bounds each invocation.
Output rows are matched to input rows by `id` when they carry one, else by order.
"""

from __future__ import annotations

from typing import Any

from orstack.io.command import CommandError, check_command, run_jsonl_command
from orstack.teachers.base import Teacher, TeacherOptions


def match_rows(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Output row for each input row: by `id` when outputs carry ids, else by position."""
    if outputs and all("id" in o for o in outputs):
        by_id = {str(o["id"]): o for o in outputs}
        return [by_id.get(str(r.get("id"))) for r in inputs]
    if len(outputs) != len(inputs):
        raise CommandError(f"wrote {len(outputs)} rows for {len(inputs)} inputs and no 'id' fields to match them")
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
        except CommandError as e:
            self._failed(str(e), len(tasks))
            return [None] * len(tasks)
        responses: list[str | None] = []
        for row in matched:
            response = None if row is None else row.get("response")
            if response is None:
                self._failed("a row came back without 'response'")
            responses.append(None if response is None else str(response))
        return responses
