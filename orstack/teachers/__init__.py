"""Teachers: anything that answers Task prompts (`--teacher SPEC`).

A SPEC is one of
- a Hugging Face checkpoint directory (greedy generation with transformers),
- a `.gguf` file (llama-cpp-python),
- an OpenAI-compatible endpoint `http(s)://HOST:PORT/v1#MODEL` (vLLM, llama.cpp's server,
  hosted APIs), with concurrency, retries with exponential backoff, a request timeout
  and a rate limit,
- `cmd:COMMAND`: a program reading Task JSONL on stdin and writing JSONL rows with a
  `response` field on stdout.

Every teacher answers a list of Task dicts with a list of responses; a response is None
when the teacher failed on that row (the error is counted in `teacher.errors`), so a
caller can escalate to the next tier instead of stopping.
"""

from __future__ import annotations

from orstack.teachers.base import Teacher, TeacherOptions, open_teacher, parse_spec

__all__ = ["Teacher", "TeacherOptions", "open_teacher", "parse_spec"]
