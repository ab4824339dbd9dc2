"""GGUF teachers (bench's llama.cpp backend: greedy, stops at EOS and stop sequences)."""

from __future__ import annotations

from orstack.errors import BadInput
from orstack.teachers.local import LocalTeacher


class GGUFTeacher(LocalTeacher):
    kind = "gguf"

    def check(self) -> None:
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise BadInput(f"--teacher {self.spec}: not a GGUF file (bad magic)")
