"""The teacher interface, its options, and SPEC parsing (cheap: no heavy imports)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orstack.errors import BadInput

if TYPE_CHECKING:
    from orstack.runtime import Runtime


@dataclass
class TeacherOptions:
    """How teachers are asked; one set shared by every tier of a run."""

    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)  # empty: each task's own `stop` field, if any
    timeout: float = 60.0  # seconds per HTTP request, or per cmd: invocation
    retries: int = 3  # extra attempts after the first, on timeouts, connection errors, 429 and 5xx
    backoff: float = 0.5  # first retry delay in seconds; doubles each attempt
    concurrency: int = 4  # parallel HTTP requests
    rate_limit: float | None = None  # at most this many HTTP requests per second (all threads)
    api_key_env: str = "OPENAI_API_KEY"
    api: str = "chat"  # endpoint teachers: "chat" (/chat/completions) or "completions" (/completions)
    batch_size: int = 16  # prompts per batch for local teachers
    chat_template: str | None = None  # local teachers' --chat-template ("model" or a .jinja path; None: messages only)


class Teacher(ABC):
    """Answers Task rows. `kind` is hf, gguf, vllm, http or cmd; `spec` is what the user gave."""

    kind: str = ""

    def __init__(self, spec: str, options: TeacherOptions) -> None:
        self.spec = spec
        self.options = options
        self.requests = 0
        self.errors = 0
        self.last_error: str | None = None

    def check(self) -> None:  # noqa: B027 - optional hook
        """Fail fast (BadInput) when the teacher cannot possibly answer: missing file, unreachable server."""

    @abstractmethod
    def answer(self, tasks: list[dict[str, Any]]) -> list[str | None]:
        """One response per task, in order; None where the teacher failed on that row."""

    def stop_for(self, task: dict[str, Any]) -> list[str]:
        """Stop sequences: the run's `stop` option, else the task's own `stop` field."""
        return list(self.options.stop) or list(task.get("stop") or [])

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model, process or connections."""

    def _failed(self, message: str, n: int = 1) -> None:
        self.errors += n
        self.last_error = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, target) for a teacher SPEC; validates what can be checked without loading anything."""
    if spec.startswith("cmd:"):
        command = spec[4:].strip()
        if not command:
            raise BadInput(f"--teacher {spec}: empty command after 'cmd:'")
        return "cmd", command
    if spec.startswith("vllm:"):  # vLLM and the GPU are checked by the teacher's check()
        if not spec[5:].strip():
            raise BadInput(f"--teacher {spec}: name a checkpoint directory or hub id after 'vllm:'")
        return "vllm", spec
    if spec.startswith(("http://", "https://")):
        base, _, model = spec.partition("#")
        if not model:
            raise BadInput(f"--teacher {spec}: name the model after '#', e.g. http://127.0.0.1:8080/v1#my-model")
        return "http", base.rstrip("/")
    path = Path(spec)
    if not path.exists():
        raise BadInput(f"--teacher {spec}: no such file or checkpoint directory")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BadInput(f"--teacher {spec}: a file teacher must be a .gguf model")
        return "gguf", str(path)
    if not (path / "config.json").exists():
        raise BadInput(f"--teacher {spec}: not a checkpoint directory (no config.json)")
    return "hf", str(path)


def open_teacher(spec: str, runtime: Runtime, options: TeacherOptions | None = None) -> Teacher:
    """A teacher for SPEC (not yet loaded: `check()` probes it, the first `answer()` loads it);
    local teachers compute on `runtime`'s device, with its threads and seed."""
    options = options or TeacherOptions()
    kind, target = parse_spec(spec)
    if kind == "cmd":
        from orstack.teachers.command import CommandTeacher

        return CommandTeacher(spec, options, target)
    if kind == "http":
        from orstack.teachers.http import HTTPTeacher

        return HTTPTeacher(spec, options, target, spec.partition("#")[2])
    if kind == "vllm":
        from orstack.teachers.vllm import VLLMTeacher

        return VLLMTeacher(spec, options, target, runtime)
    if kind == "gguf":
        from orstack.teachers.gguf import GGUFTeacher

        return GGUFTeacher(spec, options, target, runtime)
    from orstack.teachers.hf import HFTeacher

    return HFTeacher(spec, options, target, runtime)
