"""OpenAI-compatible endpoint teachers: `http(s)://HOST:PORT/v1#MODEL`.

Requests go through orstack's one OpenAI-compatible client (orstack/backends/openai.py:
timeout, retries with backoff, rate limit, API key from `api_key_env`) on a thread pool of
`concurrency` workers; greedy (temperature 0), with the run's or the task's stop sequences.
A `messages` task is sent as its conversation to /chat/completions (the server applies the
model's template), whatever --teacher-api says. `URL,URL,...#MODEL` spreads the requests over
several servers of one model (the client sends each to the least busy).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orstack.backends.openai import APIS, EndpointError, OpenAIClient, parse_endpoint
from orstack.errors import BadInput
from orstack.tasks.contract import prompt_of
from orstack.tasks.stops import cut_at_stop
from orstack.teachers.base import Teacher, TeacherOptions


class HTTPTeacher(Teacher):
    kind = "http"

    def __init__(self, spec: str, options: TeacherOptions, base_url: str, model: str) -> None:
        super().__init__(spec, options)
        if options.api not in APIS:
            raise BadInput(f"--teacher-api: expected chat or completions, got '{options.api}'")
        urls, model = parse_endpoint(spec, "--teacher")  # several servers: `URL,URL#MODEL`, spread by load
        self.client = OpenAIClient(urls, model, api=options.api, timeout=options.timeout, retries=options.retries,
                                   backoff=options.backoff, rate_limit=options.rate_limit,
                                   api_key_env=options.api_key_env)

    def check(self) -> None:
        self.client.check_reachable(f"--teacher {self.spec}")

    def _ask(self, task: dict[str, Any]) -> str | None:
        stop = self.stop_for(task)
        try:
            text = self.client.complete(prompt_of(task), max_tokens=self.options.max_new_tokens, stop=stop)
        except EndpointError as e:
            with self.client.lock:
                self._failed(str(e))
            return None
        # Servers apply `stop` themselves; cut again for those that ignore it.
        return cut_at_stop(text, stop)[0]

    def answer(self, tasks: list[dict[str, Any]]) -> list[str | None]:
        if not tasks:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.options.concurrency)) as pool:
            responses = list(pool.map(self._ask, tasks))
        self.requests = self.client.requests
        return responses
