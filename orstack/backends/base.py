"""The interface between orstack and a model runtime.

A backend generates (greedily, or sampled), scores log-likelihoods and perplexity, gives
raw next-token logits, and knows its size on disk. The transformers backend lives in hf.py,
the llama.cpp one in llamacpp.py, a served model (OpenAI-compatible) in endpoint.py;
`open_backend` picks one from the MODEL spec the user gave.
Every caller that asks a model something goes through this interface, never the runtime's
own objects, so any backend serves any caller.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from orstack.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

    from orstack.backends.endpoint import EndpointOptions
    from orstack.backends.perplexity import PerplexityResult
    from orstack.runtime import Runtime


# A prompt: a string, or a conversation in the OpenAI chat format (a list of {role, content}).
Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class Sampling:
    """How `Backend.sample` draws: temperature, nucleus (top_p), top_k (0: off), n draws per
    prompt, and the seed that makes a call reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0


@dataclass
class Generation:
    """One completion of one prompt."""

    text: str  # generated text, stop sequence removed
    prompt_tokens: int
    output_tokens: int
    token_logprobs: list[float] = field(default_factory=list)  # natural-log p of each generated token
    token_entropies: list[float] = field(default_factory=list)  # entropy (nats) of each next-token distribution
    latency_ms: float = 0.0  # wall time attributed to this row
    error: str | None = None  # why no completion came (an endpoint's failed request, with keep_going)


@runtime_checkable
class Backend(Protocol):
    name: str  # the MODEL spec as the user gave it

    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, stop: list[str]) -> list[Generation]:
        """Greedy completions; each stops at EOS, at any stop sequence, or after max_new_tokens.
        A prompt is a string or a conversation (a list of {role, content}); a conversation,
        and with a --chat-template choice any prompt, goes through the chat template
        (orstack/backends/chat.py) and also stops at the template's end-of-turn token."""
        ...

    def sample(self, prompts: list[Prompt], *, max_new_tokens: int, stop: list[str],
               sampling: Sampling) -> list[list[Generation]]:
        """`sampling.n` sampled completions per prompt (stopping as `generate` does); the same
        seed gives the same draws."""
        ...

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids as the model sees them (BOS first when the tokenizer adds one;
        a templated prompt as transformers' apply_chat_template encodes it)."""
        ...

    def prompt_text(self, prompt: Prompt) -> str:
        """The text the model reads for `prompt` (the rendered template when one applies)."""
        ...

    def context_length(self) -> int | None:
        """The context the model was trained for, in tokens (None when the model does not say)."""
        ...

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits [len(token_ids), vocab] (float32) after each position of one sequence."""
        ...

    def greedy_tokens(self, token_ids: list[int], n_tokens: int) -> list[int]:
        """`n_tokens` greedy continuation tokens of `token_ids`, EOS not treated specially."""
        ...

    def loglikelihoods(self, contexts: list[str], continuations: list[str]) -> list[float]:
        """Sum of log p(continuation tokens | context), as lm-evaluation-harness scores `choice` tasks."""
        ...

    def perplexity(self, texts: list[str], *, max_length: int, rule: str) -> PerplexityResult:
        """rule "rolling" (lm-eval loglikelihood_rolling) or "llama.cpp" (second half of each chunk)."""
        ...

    def size_bytes(self) -> int:
        """Size on disk of the model."""
        ...

    def close(self) -> None: ...



class PromptEncoding:
    """How both runtimes turn a prompt into token ids: a string as-is with BOS when the tokenizer
    adds one; a conversation (or, with a --chat-template choice, any prompt) rendered by the chat
    template and encoded as transformers' apply_chat_template does (no special tokens added: the
    template writes them). Needs `encode`, `bos`, `chat` and `eos_ids` on the backend."""

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        if self.chat.wants_template(prompt):
            return self.encode(self.chat.render(prompt))
        ids = self.encode(prompt)
        return [self.bos] + ids if self.bos is not None else ids

    def prompt_text(self, prompt: str | list[dict]) -> str:
        """The text the model reads for `prompt` (rendered when a template applies)."""
        return self.chat.render(prompt) if self.chat.wants_template(prompt) else prompt

    def _stop_ids(self, prompt: str | list[dict]) -> set[int]:
        """EOS, and the template's end-of-turn token when the prompt went through the template."""
        if self.chat.wants_template(prompt) and self.chat.end_of_turn is not None:
            return self.eos_ids | {self.chat.end_of_turn}
        return self.eos_ids


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many tokens two sequences share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def finished_text(tokens: list[int], stop: list[str], eos: set[int], decode: Callable[[list[int]], str]) -> str | None:
    """The final text of a completion that has stopped (its last token ends it, or a stop sequence
    appeared; the stop itself removed), else None."""
    from orstack.tasks.stops import cut_at_stop

    if tokens[-1] in eos:
        return cut_at_stop(decode(tokens[:-1]), stop)[0]
    if stop:
        text, stopped = cut_at_stop(decode(tokens), stop)
        if stopped:
            return text
    return None

def split_pair(encode: Callable[[str], list[int]], context: str, continuation: str, *, bos: int | None,
               start_token: Callable[[], int], max_len: int | None) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness tokenizes a pair: trailing
    context whitespace moves onto the continuation, the pair is encoded whole and the context's
    tokens split off (so a continuation that merges with the context's end is scored on the
    tokens the model would see). BOS leads when the tokenizer adds one; an empty context with
    no BOS starts from `start_token()`. Too long a pair keeps its end, as lm-eval does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = encode(context + continuation)
    n_ctx = len(encode(context))
    cont = whole[n_ctx:]
    prefix = bos if bos is not None else (start_token() if n_ctx == 0 else None)
    ctx = ([prefix] if prefix is not None else []) + whole[:n_ctx]
    if max_len and len(ctx) + len(cont) - 1 > max_len:
        ctx = ctx[-(max_len + 1 - len(cont)) :]
    return ctx, cont


def open_backend(spec: str, runtime: Runtime, *, batch_size: int = 16, chat_template: str | None = None,
                 endpoint: EndpointOptions | None = None, gguf_batch: int = 1) -> Backend:
    """`http(s)://HOST:PORT/v1#MODEL` (several servers: `URL,URL#MODEL`) opens the endpoint
    backend with `endpoint`'s options; a `.gguf` path the llama.cpp backend; `vllm:MODEL` vLLM's
    engine (where vLLM and a GPU are; bad input naming the missing one elsewhere); anything else the
    transformers one (through orstack.io.checkpoint.load_model, so every format orstack writes
    loads). `chat_template` is the run's --chat-template choice (orstack/backends/chat.py).
    `gguf_batch` is how many prompts llama.cpp decodes at once (1, the default, is the path whose
    outputs do not depend on the batch; `batch_size` is the transformers backend's, which keeps that
    promise at any size)."""
    if str(spec).startswith(("http://", "https://")):
        from orstack.backends.endpoint import open_endpoint

        return open_endpoint(str(spec), endpoint, chat_template)
    if str(spec).lower().endswith(".gguf"):
        return _open_gguf(spec, runtime, chat_template, gguf_batch)
    if str(spec).startswith("vllm:"):
        from orstack.backends.vllm import VLLMBackend

        return VLLMBackend(str(spec), seed=runtime.seed, chat_template=chat_template)
    from orstack.backends.hf import HFBackend

    return HFBackend(spec, device=runtime.torch_device(), batch_size=batch_size, trust_pickle=runtime.trust_pickle,
                     chat_template=chat_template)


def _open_gguf(spec: str, runtime: Runtime, chat_template: str | None = None, batch_size: int = 1) -> Backend:
    from pathlib import Path

    if not Path(spec).is_file():
        raise BadInput(f"{spec}: no such GGUF file")
    try:
        module = importlib.import_module("orstack.backends.llamacpp")
    except ModuleNotFoundError as e:
        if e.name in ("orstack.backends.llamacpp", "llama_cpp"):
            raise BadInput(f"{spec}: benchmarking GGUF files needs llama-cpp-python "
                           f"(module '{e.name}' is not available)") from None
        raise
    return module.LlamaCppBackend(spec, n_threads=runtime.threads, seed=runtime.seed, chat_template=chat_template,
                                  batch_size=batch_size)
