"""GGUF teachers: greedy completion with llama-cpp-python (stops at EOS and stop sequences)."""

from __future__ import annotations

from typing import Any

from orstack.errors import BadInput
from orstack.teachers.base import Teacher, TeacherOptions, cut_at_stop


class GGUFTeacher(Teacher):
    kind = "gguf"

    def __init__(self, spec: str, options: TeacherOptions, path: str) -> None:
        super().__init__(spec, options)
        self.path = path
        self.llm = None

    def check(self) -> None:
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise BadInput(f"--teacher {self.spec}: not a GGUF file (bad magic)")

    def _load(self) -> None:
        if self.llm is None:
            try:
                from llama_cpp import Llama
            except ImportError:
                raise BadInput("GGUF teachers need llama-cpp-python (pip install llama-cpp-python)") from None
            from orstack.runtime import settings

            try:
                self.llm = Llama(model_path=self.path, n_ctx=0, n_threads=2, seed=settings.seed, verbose=False)
            except (ValueError, RuntimeError) as e:
                raise BadInput(f"--teacher {self.spec}: llama.cpp cannot load it ({e})") from None

    def answer(self, tasks: list[dict[str, Any]]) -> list[str | None]:
        self._load()
        out: list[str | None] = []
        for task in tasks:
            self.requests += 1
            stop = self.stop_for(task)
            result = self.llm.create_completion(task["prompt"], max_tokens=self.options.max_new_tokens,
                                                temperature=0.0, stop=stop or None)
            out.append(cut_at_stop(result["choices"][0]["text"], stop))
        return out

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = None
