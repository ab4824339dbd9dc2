"""vLLM teachers (`vllm:MODEL`: vLLM's offline engine, greedy; where vLLM and a GPU are)."""

from __future__ import annotations

from orstack.teachers.local import LocalTeacher


class VLLMTeacher(LocalTeacher):
    kind = "vllm"

    def check(self) -> None:
        """vLLM importable and a GPU present (a hub id cannot be checked on disk here)."""
        from orstack.backends.vllm import check_vllm_available

        check_vllm_available(f"--teacher {self.spec}")
