"""Local teachers (checkpoint directories and .gguf files) generate through orstack's backends,
so a teacher answers exactly as `orstack bench` would run that model (greedy, stopping at EOS
and stop sequences; a `messages` task through the model's chat template, and every task with
the `chat_template` option), on the run's Runtime (device, threads, seed)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from orstack.tasks.contract import prompt_of
from orstack.teachers.base import Teacher, TeacherOptions

if TYPE_CHECKING:
    from orstack.runtime import Runtime


class LocalTeacher(Teacher):
    def __init__(self, spec: str, options: TeacherOptions, path: str, runtime: Runtime) -> None:
        super().__init__(spec, options)
        self.path = path
        self.runtime = runtime
        self.backend = None

    def check(self) -> None:
        """Before any weights load: the file or directory is a sound checkpoint of a causal LM."""
        from orstack.io.checkpoint import check_checkpoint

        check_checkpoint(self.path)

    def _open(self) -> Any:
        if self.backend is None:
            from orstack.backends.base import open_backend

            self.backend = open_backend(self.path, self.runtime, batch_size=self.options.batch_size,
                                        chat_template=self.options.chat_template)
        return self.backend

    def answer(self, tasks: list[dict[str, Any]]) -> list[str | None]:
        from orstack.tasks.results import check_templates

        backend = self._open()
        check_templates(backend, tasks, f"--teacher {self.spec}")
        out: list[str | None] = [None] * len(tasks)
        by_stop: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, task in enumerate(tasks):
            by_stop[tuple(self.stop_for(task))].append(i)
        for stop, rows in by_stop.items():
            self.requests += 1
            gens = backend.generate([prompt_of(tasks[i]) for i in rows], max_new_tokens=self.options.max_new_tokens,
                                    stop=list(stop))
            for i, g in zip(rows, gens):
                out[i] = g.text
        return out

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = None
