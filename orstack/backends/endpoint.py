"""A model behind an OpenAI-compatible server as a Backend: `http(s)://HOST:PORT/v1#MODEL`.

vLLM, llama.cpp's server, SGLang and hosted APIs answer through orstack's one client
(orstack/backends/openai.py: timeouts, retries, rate limit, several servers spread by load),
`concurrency` requests at a time. A `prompt` is sent raw to /completions, as a local backend
reads it; a conversation (a `messages` task, or any prompt with `--chat-template model`) goes
to /chat/completions and the server applies the model's own template.

Per-token log-probabilities are requested (the top TOP_LOGPROBS alternatives with each), so
Result rows keep mean/min logprob; the entropy is that of the returned alternatives with the
rest of the probability lumped into one outcome, a lower bound of the true entropy that is
exact when the alternatives cover the vocabulary. A server that refuses logprobs is asked
again without them (the rows then have no signal fields). `choice` tasks are scored by the
prompt's log-likelihood (echo with logprobs, one token generated and ignored), the
continuation's tokens found by their text offsets; a server that does not echo prompt
log-probabilities is a clear error. The tokenizer, raw logits and perplexity stay on the
server: those calls are refused (a local backend on the same weights gives them).

A failed request (after the retries) is bad input naming the server and the reason, so the
run ends (exit 2) before anything is written; with `keep_going` the row carries the error
instead and the run goes on.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from orstack.backends.base import Generation, Prompt, Sampling
from orstack.backends.openai import EndpointError, OpenAIClient, parse_endpoint
from orstack.errors import BadInput
from orstack.tasks.stops import cut_at_stop

TOP_LOGPROBS = 20  # vLLM's default cap; llama.cpp's server takes any number
# The model's own distribution, unpenalised (as the local backends decode): llama-cpp-python's
# server applies a repetition penalty of 1.1 unless told otherwise (vLLM, SGLang and
# llama-server default to none). Hosted APIs may refuse the field.
NO_PENALTY = {"repeat_penalty": 1.0}


@dataclass(frozen=True)
class EndpointOptions:
    """How an endpoint model is asked (the same knobs as endpoint teachers')."""

    concurrency: int = 4  # requests in flight
    timeout: float = 60.0  # seconds per request
    retries: int = 3  # extra attempts on timeouts, connection errors, 408/409/429 and 5xx
    backoff: float = 0.5  # first retry delay in seconds; doubles each attempt
    rate_limit: float | None = None  # at most this many requests per second
    api_key_env: str = "OPENAI_API_KEY"
    keep_going: bool = False  # a request that fails for good makes a row-level error instead of ending the run


def is_endpoint(spec: str) -> bool:
    return str(spec).startswith(("http://", "https://"))


class ServerTemplate:
    """The chat template as far as orstack sees it: the server's own. A conversation (or, with
    `--chat-template model`, every prompt) is sent as messages for the server to render."""

    template = "server"  # there is one, held by the server (check_templates then has nothing to refuse)

    def __init__(self, choice: str | None) -> None:
        self.choice = choice

    def wants_template(self, prompt: Prompt) -> bool:
        return not isinstance(prompt, str) or self.choice == "model"

    def record(self) -> dict[str, Any]:
        return {"chat_template": self.choice or "server", "chat_template_sha256": None}


class EndpointBackend:
    """A served model under test; thread-safe calls, `concurrency` requests in flight."""

    def __init__(self, spec: str, options: EndpointOptions | None = None, *, chat_template: str | None = None) -> None:
        self.name = spec
        self.options = options or EndpointOptions()
        if chat_template not in (None, "model"):
            raise BadInput(f"--chat-template {chat_template}: {spec} is served; its server applies the model's "
                           "own template (use --chat-template model, or none)")
        urls, model = parse_endpoint(spec, "MODEL")
        o = self.options
        self.client = OpenAIClient(urls, model, api="completions", timeout=o.timeout, retries=o.retries,
                                   backoff=o.backoff, rate_limit=o.rate_limit, api_key_env=o.api_key_env)
        self.chat = ServerTemplate(chat_template)
        self.logprobs = True  # until the server refuses them
        self.errors = 0  # rows that failed for good (keep_going)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=max(1, o.concurrency))
        self.load_seconds = 0.0

    def check(self) -> None:
        """Bad input when no server of the spec answers at all."""
        self.client.check_reachable(self.name)

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, stop: list[str]) -> list[Generation]:
        return self._map(lambda p: self._complete(p, max_new_tokens, stop, {"temperature": 0.0}), prompts)

    def sample(self, prompts: list[Prompt], *, max_new_tokens: int, stop: list[str],
               sampling: Sampling) -> list[list[Generation]]:
        """`sampling.n` draws per prompt, one request each, seeded `seed + draw` (servers that
        honour `seed`, as vLLM and llama.cpp's do, repeat them)."""
        params = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.top_k:
            params["top_k"] = sampling.top_k  # an extension vLLM, SGLang and llama.cpp accept
        jobs = [(p, {**params, "seed": sampling.seed + k}) for p in prompts for k in range(sampling.n)]
        flat = self._map(lambda job: self._complete(job[0], max_new_tokens, stop, job[1]), jobs)
        return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _map(self, fn, items: list) -> list:  # noqa: ANN001 - a callable over items
        """fn over items, `concurrency` at a time, in order; the first failure (without
        keep_going) cancels what has not started and ends the call."""
        futures = [self.pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _complete(self, prompt: Prompt, max_new_tokens: int, stop: list[str], params: dict[str, Any]) -> Generation:
        began = time.perf_counter()
        chat = self.chat.wants_template(prompt)
        payload: dict[str, Any] = {"model": self.client.model, "max_tokens": max_new_tokens, **params}
        if stop:
            payload["stop"] = list(stop)
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
                [{"role": m["role"], "content": m["content"]} for m in prompt]
            path, payload = "/chat/completions", {**payload, "messages": messages}
        else:
            path, payload = "/completions", {**payload, "prompt": prompt}
        try:
            body = self._post_with_logprobs(path, payload, chat)
            text, logprobs, entropies = _parse_completion(body, chat)
        except EndpointError as e:
            return self._failed(str(e), began)
        usage = body.get("usage") or {}
        # Servers apply `stop` themselves; cut again for those that ignore it.
        text = cut_at_stop(text, stop)[0]
        return Generation(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          output_tokens=int(usage.get("completion_tokens") or len(logprobs)),
                          token_logprobs=logprobs, token_entropies=entropies,
                          latency_ms=(time.perf_counter() - began) * 1000)

    def _post_with_logprobs(self, path: str, payload: dict[str, Any], chat: bool) -> dict[str, Any]:
        """The answer with logprobs and no repetition penalty asked for, or, when the
        server refuses the request as asked (hosted APIs cap or refuse logprobs and unknown
        fields), without them from then on."""
        if self.logprobs:
            asked = ({"logprobs": True, "top_logprobs": TOP_LOGPROBS} if chat else {"logprobs": TOP_LOGPROBS})
            asked.update(NO_PENALTY)
            try:
                return self.client.post(path, {**payload, **asked})
            except EndpointError as e:
                if not str(e).startswith(("HTTP 400", "HTTP 422")):
                    raise
            body = self.client.post(path, payload)
            self.logprobs = False
            return body
        return self.client.post(path, payload)

    def _failed(self, message: str, began: float) -> Generation:
        if not self.options.keep_going:
            raise BadInput(f"{self.name}: {message}")
        with self.lock:
            self.errors += 1
        return Generation(text="", prompt_tokens=0, output_tokens=0, error=f"endpoint: {message}",
                          latency_ms=(time.perf_counter() - began) * 1000)

    # -- scoring -----------------------------------------------------------------------------
    def loglikelihoods(self, contexts: list[Prompt], continuations: list[str]) -> list[float]:
        """Sum of log p(continuation | context) from the server's echoed prompt log-probabilities;
        trailing context whitespace moves onto the continuation, as lm-evaluation-harness splits
        a pair. NaN for a pair whose request failed (keep_going)."""
        if any(not isinstance(c, str) for c in contexts) or self.chat.choice == "model":
            raise BadInput(f"{self.name}: choice tasks on an endpoint need `prompt` strings scored raw "
                           "(/chat/completions gives no prompt log-probabilities)")
        return self._map(lambda pair: self._loglikelihood(*pair), list(zip(contexts, continuations)))

    def _loglikelihood(self, context: str, continuation: str) -> float:
        began = time.perf_counter()
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = context + continuation
        payload = {"model": self.client.model, "prompt": whole, "max_tokens": 1, "temperature": 0.0, "echo": True,
                   "logprobs": 1}  # the generated token is ignored, so its penalty does not matter
        try:
            body = self.client.post("/completions", payload)
        except EndpointError as e:
            if str(e).startswith(("HTTP 400", "HTTP 422")):
                raise BadInput(f"{self.name}: choice tasks need the prompt's log-probabilities (echo with logprobs) "
                               f"and the server refused the request ({e})") from None
            self._failed(str(e), began)
            return math.nan
        return _continuation_logprob(body, whole, len(context), self.name)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        raise BadInput(f"{self.name}: the tokenizer of a served model is not available here")

    def prompt_text(self, prompt: Prompt) -> str:
        if not isinstance(prompt, str):
            raise BadInput(f"{self.name}: the server renders conversations; their text is not available here")
        return prompt

    def context_length(self) -> int | None:
        return None  # the server refuses a prompt too long for it, naming the row

    def logits(self, token_ids: list[int]):  # noqa: ANN201
        raise BadInput(f"{self.name}: raw logits are not available from an endpoint")

    def greedy_tokens(self, token_ids: list[int], n_tokens: int) -> list[int]:
        raise BadInput(f"{self.name}: token-level generation is not available from an endpoint")

    def perplexity(self, texts: list[str], *, max_length: int, rule: str):  # noqa: ANN201
        raise BadInput(f"{self.name}: --ppl needs the model's tokenizer and logits; bench the weights locally")

    def size_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _parse_completion(body: Any, chat: bool) -> tuple[str, list[float], list[float]]:
    """(text, generated tokens' logprobs, entropies) of a completions or chat answer."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError("response has no choices[0] text") from None
    logprobs: list[float] = []
    entropies: list[float] = []
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    if isinstance(lp, dict):
        if chat:
            for item in lp.get("content") or []:
                if isinstance(item, dict) and isinstance(item.get("logprob"), (int, float)):
                    logprobs.append(float(item["logprob"]))
                    alts = [a.get("logprob") for a in item.get("top_logprobs") or [] if isinstance(a, dict)]
                    entropies.append(_entropy_lower_bound([float(a) for a in alts if isinstance(a, (int, float))]))
        else:
            tops = lp.get("top_logprobs") or []
            for i, value in enumerate(lp.get("token_logprobs") or []):
                if isinstance(value, (int, float)):
                    logprobs.append(float(value))
                    top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
                    entropies.append(_entropy_lower_bound([float(v) for v in top.values()
                                                           if isinstance(v, (int, float))]))
    if entropies and len(entropies) != len(logprobs):
        entropies = []
    return str(text or ""), logprobs, entropies


def _entropy_lower_bound(alternatives: list[float]) -> float:
    """Entropy (nats) of the distribution whose top alternatives have these logprobs, the rest of
    the mass taken as one outcome: the true entropy when they cover the vocabulary, else below it."""
    probs = [math.exp(a) for a in alternatives if math.isfinite(a)]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * math.log(p) for p in probs + [rest] if p > 0)


def _continuation_logprob(body: Any, whole: str, n_context: int, name: str) -> float:
    """The summed logprobs of the echoed prompt's tokens that start at or after the context."""
    try:
        choice = body["choices"][0]
        lp = choice["logprobs"]
        offsets, values = lp["text_offset"], lp["token_logprobs"]
        echoed = str(choice.get("text", ""))
    except (KeyError, IndexError, TypeError):
        offsets, values, echoed = None, None, ""
    if not offsets or not values or not echoed.startswith(whole):
        raise BadInput(f"{name}: the server did not return prompt log-probabilities (echo with logprobs); "
                       "choice tasks need them (vLLM and llama.cpp's server give them on /completions)")
    total = 0.0
    for offset, value in zip(offsets, values):
        if n_context <= offset < len(whole):
            if value is None:
                raise BadInput(f"{name}: the server gave no log-probability for the first prompt token, "
                               "so an empty context cannot be scored")
            total += float(value)
    return total


def open_endpoint(spec: str, options: EndpointOptions | None, chat_template: str | None) -> EndpointBackend:
    backend = EndpointBackend(spec, options, chat_template=chat_template)
    try:
        backend.check()
    except BadInput:
        backend.close()
        raise
    return backend
