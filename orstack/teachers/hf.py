"""Hugging Face checkpoint teachers (the transformers backend: batched greedy generation)."""

from __future__ import annotations

from orstack.teachers.local import LocalTeacher


class HFTeacher(LocalTeacher):
    kind = "hf"
