"""The vLLM backend: `vllm:MODEL` (a checkpoint directory or a hub id) run by vLLM's offline engine.

Only where vLLM is installed (the optional extra `orstack[vllm]`) and a CUDA GPU is present;
anywhere else opening it is bad input with the reason ("vllm is not installed", "no GPU"),
before anything loads. Prompts are encoded here exactly as the transformers backend encodes
them (the same chat templating, BOS rule and end-of-turn stop: PromptEncoding) and handed to
vLLM as token ids, so both engines read the same tokens; vLLM batches and caches shared
prefixes itself (continuous batching, prefix caching). Greedy is temperature 0. Per-token
logprobs come with the TOP_LOGPROBS most likely alternatives, so the entropy is the same lower
bound the endpoint backend reports (exact when they cover the distribution). `choice` tasks and
perplexity are scored from prompt logprobs; raw logits stay inside the engine.
"""

from __future__ import annotations

import importlib.util
import time
from typing import TYPE_CHECKING, Any

from orstack.backends.base import Generation, PromptEncoding, Sampling, split_pair
from orstack.errors import BadInput
from orstack.tasks.stops import cut_at_stop

if TYPE_CHECKING:
    from orstack.backends.perplexity import PerplexityResult

PREFIX = "vllm:"
TOP_LOGPROBS = 20  # vLLM's default max_logprobs


def is_vllm(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def check_vllm_available(what: str) -> None:
    """Bad input naming `what` unless vLLM is importable and torch sees a CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        raise BadInput(f"{what}: vllm is not installed (pip install 'orstack[vllm]' on a machine with a CUDA GPU)")
    import torch

    if not torch.cuda.is_available():
        raise BadInput(f"{what}: no GPU (vLLM needs a CUDA device; torch {torch.__version__} sees none)")


def check_vllm(spec: str) -> str:
    """The model vLLM should load for SPEC, once vLLM and a GPU are known to be there."""
    target = str(spec)[len(PREFIX):].strip()
    if not target:
        raise BadInput(f"{spec}: name a checkpoint directory or hub id after 'vllm:'")
    check_vllm_available(spec)
    return target


class VLLMBackend(PromptEncoding):
    """A model in vLLM's offline engine (`vllm.LLM`), greedy at temperature 0."""

    def __init__(self, spec: str, *, seed: int = 0, chat_template: str | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.85) -> None:
        from vllm import LLM

        from orstack.backends.hf import _templating, _tokenizer_adds_bos

        target = check_vllm(spec)
        started = time.perf_counter()
        self.name = str(spec)
        self.llm = LLM(model=target, seed=seed, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=True, max_logprobs=TOP_LOGPROBS)
        self.load_seconds = time.perf_counter() - started
        self.tokenizer = tok = self.llm.get_tokenizer()
        self._max_len = getattr(getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None)
        self.eos_ids = _eos_ids(target, tok)
        self.bos = tok.bos_token_id if _tokenizer_adds_bos(tok) else None
        self.chat = _templating(self.name, tok, chat_template)
        self._target = target

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context_length(self) -> int | None:
        return self._max_len

    def _run(self, token_lists: list[list[int]], params: list[Any]) -> list[Any]:
        return self.llm.generate([{"prompt_token_ids": ids} for ids in token_lists], params, use_tqdm=False)

    def generate(self, prompts: list[Any], *, max_new_tokens: int, stop: list[str]) -> list[Generation]:
        from vllm import SamplingParams

        encoded = [self.encode_prompt(p) for p in prompts]
        params = [SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None,
                                 stop_token_ids=sorted(self._stop_ids(p)), logprobs=TOP_LOGPROBS,
                                 skip_special_tokens=True) for p in prompts]
        began = time.perf_counter()
        outs = self._run(encoded, params)
        per_row_ms = (time.perf_counter() - began) * 1000 / max(1, len(prompts))
        return [self._generation(ids, out.outputs[0], stop, per_row_ms) for ids, out in zip(encoded, outs)]

    def sample(self, prompts: list[Any], *, max_new_tokens: int, stop: list[str],
               sampling: Sampling) -> list[list[Generation]]:
        """vLLM's own sampler, `sampling.n` draws per prompt, each prompt seeded from the call's seed."""
        from vllm import SamplingParams

        encoded = [self.encode_prompt(p) for p in prompts]
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, seed=sampling.seed + i, max_tokens=max_new_tokens,
                                 stop=list(stop) or None, stop_token_ids=sorted(self._stop_ids(p)),
                                 skip_special_tokens=True) for i, p in enumerate(prompts)]
        began = time.perf_counter()
        outs = self._run(encoded, params)
        per_draw_ms = (time.perf_counter() - began) * 1000 / max(1, len(prompts) * sampling.n)
        return [[self._generation(ids, c, stop, per_draw_ms) for c in out.outputs] for ids, out in zip(encoded, outs)]

    def _generation(self, ids: list[int], completion: Any, stop: list[str], latency_ms: float) -> Generation:
        logprobs, entropies = [], []
        for tok, top in zip(completion.token_ids, completion.logprobs or []):
            if tok in top:
                logprobs.append(float(top[tok].logprob))
                entropies.append(_entropy_lower_bound([float(lp.logprob) for lp in top.values()]))
        if len(logprobs) != len(completion.token_ids):
            logprobs, entropies = [], []
        return Generation(text=cut_at_stop(completion.text, stop)[0], prompt_tokens=len(ids),
                          output_tokens=len(completion.token_ids), token_logprobs=logprobs,
                          token_entropies=entropies, latency_ms=latency_ms)

    def _prompt_logprobs(self, token_lists: list[list[int]]) -> list[list[float]]:
        """log p(token i | tokens before it) for i >= 1 of each sequence (vLLM's prompt logprobs)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        rows = []
        for ids, out in zip(token_lists, self._run(token_lists, [params] * len(token_lists))):
            rows.append([float(step[tok].logprob) for tok, step in zip(ids[1:], out.prompt_logprobs[1:])])
        return rows

    def loglikelihoods(self, contexts: list[Any], continuations: list[str]) -> list[float]:
        """Tokenized as the transformers backend does (lm-eval's split), scored from prompt logprobs."""
        pairs = [self._split_pair(c, x) for c, x in zip(contexts, continuations)]
        scored = self._prompt_logprobs([ctx + cont for ctx, cont in pairs])
        return [sum(row[len(row) - len(cont):]) for row, (_, cont) in zip(scored, pairs)]

    def _split_pair(self, context: Any, continuation: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        templated = self.chat.wants_template(context)
        return split_pair(self.encode, self.prompt_text(context), continuation, bos=None if templated else self.bos,
                          start_token=lambda: tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                          max_len=self.context_length())

    def perplexity(self, texts: list[str], *, max_length: int, rule: str) -> PerplexityResult:
        """The windows and definitions of orstack.backends.perplexity, scored by vLLM's prompt logprobs."""
        from orstack.backends.perplexity import PerplexityResult, prefix_token, windows_of

        windows, n_bytes = windows_of(texts, self.encode, self.tokenizer.decode, prefix_token(self.tokenizer),
                                      max_length, rule)
        scored = self._prompt_logprobs([w.input_ids + [w.target_last] for w in windows])
        nll = -sum(sum(row[len(row) - w.n_scored:]) for row, w in zip(scored, windows))
        return PerplexityResult(nll, sum(w.n_scored for w in windows), n_bytes, rule)

    def greedy_tokens(self, token_ids: list[int], n_tokens: int) -> list[int]:
        from vllm import SamplingParams

        out = self._run([token_ids], [SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)])
        return list(out[0].outputs[0].token_ids)

    def logits(self, token_ids: list[int]):  # noqa: ANN201
        raise BadInput(f"{self.name}: vLLM does not hand out raw logits; use the checkpoint directory itself "
                       f"(the transformers backend) for this measure")

    def size_bytes(self) -> int:
        from pathlib import Path

        from orstack.backends.hf import disk_size

        return disk_size(Path(self._target))

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()


def _eos_ids(target: str, tok: Any) -> set[int]:
    """EOS ids from the tokenizer and the checkpoint's generation config (as the transformers backend reads them)."""
    ids = {tok.eos_token_id} if isinstance(tok.eos_token_id, int) else set()
    try:
        from transformers import GenerationConfig

        value = GenerationConfig.from_pretrained(target).eos_token_id
    except (OSError, ValueError):
        value = None
    ids.update([value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)])
    return ids


def _entropy_lower_bound(alternatives: list[float]) -> float:
    from orstack.backends.endpoint import _entropy_lower_bound as bound

    return bound(alternatives)
