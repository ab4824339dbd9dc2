"""An OpenAI-compatible HTTP client: what vLLM, llama.cpp's server and hosted APIs speak.

One client for every endpoint orstack talks to (`http(s)://HOST:PORT/v1#MODEL` teachers and
models under test, the cluster-failures labeler). stdlib urllib only. Each request has a
timeout; timeouts, connection errors, HTTP 408/409/429 and 5xx are retried with exponential
backoff (honouring Retry-After, capped); a rate limiter shared by all threads spaces request
starts. A spec may name several servers of one model (`http://a:8000/v1,http://b:8000/v1#M`):
each attempt goes to the one with the fewest requests in flight, so load spreads and a retry
can land on a healthy server. The API key is read from the environment variable the caller
names (`--api-key-env`), so the secret never travels in a config or a manifest.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from orstack.errors import BadInput

APIS = ("chat", "completions")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER = 30.0


class EndpointError(RuntimeError):
    """No answer from the endpoint (after the retries, when the failure was worth retrying)."""


class RetryableError(EndpointError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


def parse_endpoint(spec: str, what: str) -> tuple[list[str], str]:
    """(base URLs, model) of `URL[,URL...]#MODEL`; BadInput naming `what` when malformed."""
    base, _, model = spec.partition("#")
    if not model:
        raise BadInput(f"{what} {spec}: name the model after '#', e.g. http://127.0.0.1:8080/v1#my-model")
    urls = [u.strip().rstrip("/") for u in base.split(",")]
    bad = next((u for u in urls if not u.startswith(("http://", "https://")) or len(u.split("//", 1)[1]) == 0), None)
    if bad is not None:
        raise BadInput(f"{what} {spec}: '{bad}' is not an http(s):// URL")
    return urls, model


class OpenAIClient:
    """Completions from one model behind one or more OpenAI-compatible base URLs (`.../v1`);
    thread-safe."""

    def __init__(self, base_url: str | list[str], model: str, *, api: str = "chat", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, rate_limit: float | None = None,
                 api_key_env: str = "OPENAI_API_KEY") -> None:
        if api not in APIS:
            raise ValueError(f"api: expected chat or completions, got '{api}'")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.base_urls = [u.rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
        self.in_flight = dict.fromkeys(self.base_urls, 0)
        self.sent = dict.fromkeys(self.base_urls, 0)  # requests per server, retries included
        self.model = model
        self.api = api
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.limiter = RateLimiter(rate_limit)
        self.api_key = os.environ.get(api_key_env) or None
        self.requests = 0  # HTTP requests sent, retries included
        self.lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def check_reachable(self, what: str) -> None:
        """A server that answers at all (any HTTP status) is reachable; a refusing or silent one is
        bad input (every server of the spec is probed)."""
        for url in self.base_urls:
            request = urllib.request.Request(f"{url}/models", headers=self.headers())
            try:
                with urllib.request.urlopen(request, timeout=min(self.timeout, 10.0)):  # noqa: S310 - user-given URL
                    pass
            except urllib.error.HTTPError:
                continue
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                where = f" {url}" if len(self.base_urls) > 1 else ""
                raise BadInput(f"{what}: cannot reach the server{where} ({reason})") from None

    def complete(self, prompt: str | list[dict[str, Any]], *, max_tokens: int, temperature: float = 0.0,
                 stop: list[str] | None = None) -> str:
        """The model's text for `prompt` (a user message with the chat API); a conversation (a
        list of {role, content}) always goes to /chat/completions as its `messages`, whatever
        the api; EndpointError when no text came."""
        path, payload = self._payload(prompt, max_tokens, temperature, stop)
        return self._text(self.post(path, payload), chat=path == "/chat/completions")

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer to one request, retried as the module says; EndpointError when none came."""
        delay, attempt = self.backoff, 0
        while True:
            self.limiter.wait()
            url = self._pick()
            try:
                return self._post(path, payload, url)
            except RetryableError as e:
                if attempt == self.retries:
                    raise EndpointError(str(e)) from None
                time.sleep(min(e.retry_after, MAX_RETRY_AFTER) if e.retry_after else delay)
                delay, attempt = delay * 2, attempt + 1
            finally:
                with self.lock:
                    self.in_flight[url] -= 1

    def _pick(self) -> str:
        """The server with the fewest requests in flight (then the fewest sent), now one busier."""
        with self.lock:
            url = min(self.base_urls, key=lambda u: (self.in_flight[u], self.sent[u]))
            self.in_flight[url] += 1
            self.sent[url] += 1
            self.requests += 1
        return url

    def _payload(self, prompt: str | list[dict[str, Any]], max_tokens: int, temperature: float,
                 stop: list[str] | None) -> tuple[str, dict[str, Any]]:
        common: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            common["stop"] = list(stop)
        if not isinstance(prompt, str):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
            return "/chat/completions", {**common, "messages": messages}
        if self.api == "chat":
            return "/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
        return "/completions", {**common, "prompt": prompt}

    def _post(self, path: str, payload: dict[str, Any], url: str | None = None) -> dict[str, Any]:
        data = json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(f"{url or self.base_url}{path}", data=data, headers=self.headers(),
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - user-given URL
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            message = f"HTTP {e.code} from {path}"
            if e.code in RETRY_STATUS:
                raise RetryableError(message, _retry_after(e.headers.get("Retry-After"))) from None
            raise EndpointError(message + _error_detail(e)) from None
        except TimeoutError:
            raise RetryableError(f"timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise RetryableError(f"timed out after {self.timeout:g} s") from None
            raise RetryableError(f"connection failed ({e.reason})") from None
        except (ConnectionError, OSError) as e:
            raise RetryableError(f"connection failed ({e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EndpointError(f"{path} did not return JSON") from None

    def _text(self, body: Any, chat: bool | None = None) -> str:
        chat = self.api == "chat" if chat is None else chat
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError("response has no choices[0] text") from None
        return str(text or "")


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's own reason for a refusal (OpenAI's {"error": {"message"}} or any short body)."""
    try:
        body = e.read(2000).decode("utf-8", errors="replace")
    except OSError:
        return ""
    try:
        err = json.loads(body).get("error", body)
        body = str(err.get("message", err) if isinstance(err, dict) else err)
    except (json.JSONDecodeError, AttributeError):
        pass
    body = " ".join(body.split())[:200]
    return f": {body}" if body else ""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
