"""Hugging Face checkpoint teachers (bench's transformers backend: batched greedy generation)."""

from __future__ import annotations

from orstack.teachers.local import LocalTeacher


class HFTeacher(LocalTeacher):
    kind = "hf"

    def check(self) -> None:
        from orstack.io.checkpoint import load_config

        load_config(self.path)
