"""GGUF teachers (the llama.cpp backend: greedy, stops at EOS and stop sequences)."""

from __future__ import annotations

from orstack.teachers.local import LocalTeacher


class GGUFTeacher(LocalTeacher):
    kind = "gguf"
