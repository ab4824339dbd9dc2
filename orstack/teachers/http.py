"""OpenAI-compatible endpoint teachers: `http(s)://HOST:PORT/v1#MODEL`.

What vLLM, llama.cpp's server and hosted APIs speak. Requests run on a thread pool
(`concurrency`), each with a timeout; timeouts, connection errors, HTTP 429 and 5xx are
retried with exponential backoff (honouring Retry-After); a shared rate limiter spaces
request starts. The key comes from the environment variable `api_key_env`.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orstack.errors import BadInput
from orstack.tasks.stops import cut_at_stop
from orstack.teachers.base import Teacher, TeacherOptions

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0


class RateLimiter:
    """At most `rate` request starts per second across threads (None: unlimited)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


class RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HTTPTeacher(Teacher):
    kind = "http"

    def __init__(self, spec: str, options: TeacherOptions, base_url: str, model: str) -> None:
        super().__init__(spec, options)
        if options.api not in ("chat", "completions"):
            raise BadInput(f"--teacher-api: expected chat or completions, got '{options.api}'")
        self.base_url = base_url
        self.model = model
        self.limiter = RateLimiter(options.rate_limit)
        self.lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.options.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def check(self) -> None:
        """A server that answers at all (any HTTP status) is reachable; refusing or silent ones are bad input."""
        request = urllib.request.Request(f"{self.base_url}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.options.timeout, 10.0)):  # noqa: S310
                pass
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BadInput(f"--teacher {self.spec}: cannot reach the server ({reason})") from None

    def _payload(self, task: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        common: dict[str, Any] = {"model": self.model, "max_tokens": self.options.max_new_tokens, "temperature": 0.0}
        if self.stop_for(task):
            common["stop"] = self.stop_for(task)
        if self.options.api == "chat":
            return "/chat/completions", {**common, "messages": [{"role": "user", "content": task["prompt"]}]}
        return "/completions", {**common, "prompt": task["prompt"]}

    def _post_once(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout) as response:  # noqa: S310
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            message = f"HTTP {e.code} from {path}"
            if e.code in RETRY_STATUS:
                raise RetryableError(message, _retry_after(e.headers.get("Retry-After"))) from None
            raise RuntimeError(message) from None
        except TimeoutError:
            raise RetryableError(f"timed out after {self.options.timeout:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise RetryableError(f"timed out after {self.options.timeout:g} s") from None
            raise RetryableError(f"connection failed ({e.reason})") from None
        except (ConnectionError, OSError) as e:
            raise RetryableError(f"connection failed ({e})") from None
        except json.JSONDecodeError:
            raise RuntimeError(f"{path} did not return JSON") from None

    def _ask(self, task: dict[str, Any]) -> str | None:
        path, payload = self._payload(task)
        delay = self.options.backoff
        for attempt in range(self.options.retries + 1):
            self.limiter.wait()
            with self.lock:
                self.requests += 1
            try:
                return self._text(self._post_once(path, payload), self.stop_for(task))
            except RetryableError as e:
                error = str(e)
                if attempt == self.options.retries:
                    break
                time.sleep(min(e.retry_after, MAX_RETRY_AFTER) if e.retry_after else delay)
                delay *= 2
            except RuntimeError as e:
                error = str(e)
                break
        with self.lock:
            self._failed(error)
        return None

    def _text(self, body: dict[str, Any], stop: list[str]) -> str:
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] if self.options.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError("response has no choices[0] text") from None
        # Servers apply `stop` themselves; cut again for those that ignore it.
        return cut_at_stop(text or "", stop)[0]

    def answer(self, tasks: list[dict[str, Any]]) -> list[str | None]:
        if not tasks:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.options.concurrency)) as pool:
            return list(pool.map(self._ask, tasks))


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
