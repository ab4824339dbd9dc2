"""The llama.cpp backend: a GGUF file run through llama-cpp-python.

Every request is evaluated token by token through `Llama.eval` with all logits kept
(`logits_all`), so greedy decoding, per-token log-probabilities and entropies, and
perplexity are computed here in numpy from the raw logits, with the same windows and
tokenization rules as the transformers backend (orstack/backends/hf.py, perplexity.py):
figures from the two backends are directly comparable. The KV cache is F32 so an F32
GGUF reproduces transformers' float32 logits (the default F16 cache alone moves them
by ~1e-2).

One prompt at a time (the default), generation runs in a context of its own that keeps the KV
cache of whatever prefix the next prompt shares with the last one (a chat template's head), and
computes logits for the last prompt token only: the same answers as a fresh cache (tested on
Q8_0), for about two thirds of the CPU time on SmolLM2's chat tasks.

With `batch_size` > 1 (`bench --gguf-batch N`), `generate` decodes up to that many prompts
together (a second context on the same model, one sequence per prompt in a shared KV cache,
their common prefix evaluated once, one llama_decode per step for all of them). On F32 weights
the outputs are those of one prompt at a time (logits within ~1e-6; tests/test_llamacpp_batch.py);
llama.cpp's quantized matmul kernels round a batch differently from a single row, so on
quantized weights a near-tied greedy choice can flip (SmolLM2-135M Q4_1: 29 of 32 answers
identical). That is why one prompt at a time is the default, the path whose outputs bench's
batch invariance promises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from orstack.backends.base import Generation, PromptEncoding, Sampling, common_prefix_length, finished_text, split_pair
from orstack.errors import BadInput

if TYPE_CHECKING:
    from orstack.backends.perplexity import PerplexityResult

GGML_TYPE_F32 = 0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@contextmanager
def _quiet_llama_cpp() -> Iterator[None]:
    """Silence llama.cpp's log while a model loads.

    With verbose=False llama-cpp-python still lets warnings through, e.g. "n_ctx_seq > n_ctx_train"
    for every model trained on fewer than 256 positions (llama.cpp pads contexts to 256)."""
    import llama_cpp.llama as module

    original = module.set_verbose
    module.set_verbose = lambda _verbose: logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        module.set_verbose = original


def _default_threads() -> int:
    """torch's thread count when torch is loaded (so `bench --threads` applies to both
    runtimes), else every core (llama-cpp-python's own default is half of them)."""
    import os
    import sys

    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return os.cpu_count() or 1


def _context_length(path: Path) -> int:
    """The training context length written in the GGUF header (0 if absent)."""
    from orstack.io.gguf_file import read_gguf_values

    arch = read_gguf_values(path, {"general.architecture"}).get("general.architecture")
    if arch is None:
        return 0
    key = f"{arch}.context_length"
    return int(read_gguf_values(path, {key}).get(key, 0))


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token from softmax(logits / temperature), keeping only the top_k most likely (0: all)
    and the smallest set whose probability reaches top_p."""
    z = logits.astype(np.float64) / max(sampling.temperature, 1e-6)
    order = np.argsort(-z, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), sampling.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class LlamaCppBackend(PromptEncoding):
    """A GGUF model in llama.cpp (CPU), greedy and deterministic."""

    def __init__(self, spec: str, *, n_ctx: int = 512, n_threads: int | None = None, seed: int = 0,
                 chat_template: str | None = None, batch_size: int = 1) -> None:
        path = Path(spec)
        if not path.is_file():
            raise BadInput(f"{spec}: no such GGUF file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise BadInput(f"{spec}: not a GGUF file (bad magic)")
        self.name = str(spec)
        self.path = path
        self.batch_size = batch_size  # sequences generated at once (1: one prompt at a time)
        self._batched: _BatchedContext | None = None
        self._single: _PrefixSequence | None = None
        self.n_threads = n_threads or _default_threads()
        self.seed = seed
        self.llm = None
        self._n_ctx = 0
        self.n_ctx_train = _context_length(path)
        started = time.perf_counter()
        self._open(min(n_ctx, self.n_ctx_train) if self.n_ctx_train else n_ctx)
        self.load_seconds = time.perf_counter() - started
        self.bos = self.llm.token_bos() if self.llm._model.add_bos_token() and self.llm.token_bos() >= 0 else None
        self.eos_ids = {t for t in (self.llm.token_eos(), self.llm._model.token_eot()) if t >= 0}
        meta = self.llm.metadata
        self._space_prefix = (meta.get("tokenizer.ggml.model") == "llama"
                              and meta.get("tokenizer.ggml.add_space_prefix", "true") == "true")
        self.chat = self._templating(chat_template)

    def _templating(self, choice: str | None):  # noqa: ANN202 - ChatTemplating
        """The run's chat-template choice against the GGUF's `tokenizer.chat_template`, rendered
        with jinja2 as transformers renders it; the special tokens the template sees are the
        ones the metadata names (bos, eos, unk, pad)."""
        import llama_cpp

        from orstack.backends.chat import ChatTemplating, end_of_turn_token

        meta = self.llm.metadata
        special = {}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is not None and 0 <= int(value) < self.llm.n_vocab():
                text = self.llm._model.token_get_text(int(value))
                special[name] = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        chat = ChatTemplating(choice, meta.get("tokenizer.chat_template"), special, self.name)
        if chat.template is not None:
            vocab = self.llm._model.vocab
            chat.end_of_turn = end_of_turn_token(chat.template, special, self.encode,
                                                 lambda i: bool(llama_cpp.llama_vocab_is_control(vocab, i)))
        return chat

    def _open(self, n_ctx: int) -> None:
        """(Re)create the llama.cpp context with room for `n_ctx` tokens."""
        try:
            from llama_cpp import Llama
        except ImportError:
            raise BadInput(f"{self.name}: running GGUF files needs llama-cpp-python") from None
        if self.llm is not None:
            self.llm.close()
        try:
            with _quiet_llama_cpp():
                self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False,
                                 seed=self.seed,
                                 # prompts too: llama-cpp-python's default for them is every core,
                                 # and its extra worker then contends with each one-token decode
                                 n_threads=self.n_threads, n_threads_batch=self.n_threads)
        except (ValueError, RuntimeError) as e:
            raise BadInput(f"{self.name}: llama.cpp cannot load it ({e})") from None
        self._n_ctx = n_ctx

    def _ensure_ctx(self, n_tokens: int) -> None:
        if n_tokens > self._n_ctx:
            grown = max(n_tokens, 2 * self._n_ctx)
            self._open(max(n_tokens, min(grown, self.n_ctx_train)) if self.n_ctx_train else grown)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] of a fresh sequence."""
        self._ensure_ctx(len(token_ids))
        self.llm.reset()
        self.llm.eval(token_ids)
        return self.llm.scores[: len(token_ids)]

    def greedy_tokens(self, token_ids: list[int], n_tokens: int) -> list[int]:
        self._ensure_ctx(len(token_ids) + n_tokens)
        self.llm.reset()
        self.llm.eval(token_ids)
        out: list[int] = []
        for i in range(n_tokens):
            tok = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            out.append(tok)
            if i + 1 < n_tokens:
                self.llm.eval([tok])
        return out

    # -- tokenization ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        # special=True: control tokens written in the text are parsed, as transformers does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def context_length(self) -> int | None:
        return self.n_ctx_train or None

    def decode(self, tokens: list[int]) -> str:
        """Text of `tokens` as transformers decodes it (special tokens skipped).

        llama-cpp-python's detokenize uses a 32-byte buffer per token and garbles longer
        pieces, so pieces are read here with a buffer that grows as needed."""
        import ctypes

        import llama_cpp

        vocab = self.llm._model.vocab
        out = b""
        size = 64
        buffer = ctypes.create_string_buffer(size)
        for tok in tokens:
            n = llama_cpp.llama_token_to_piece(vocab, tok, buffer, size, 0, False)
            if n < 0:
                size = -n
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, tok, buffer, size, 0, False)
            out += buffer.raw[:n]
        text = out.decode("utf-8", errors="replace")
        # SentencePiece vocabularies: the decoder drops the space that encoding prepended.
        return text[1:] if self._space_prefix and text.startswith(" ") else text

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str]) -> list[Generation]:
        if self.batch_size <= 1 or len(prompts) <= 1:
            return [self._generate_one(p, max_new_tokens, stop) for p in prompts]
        encoded = [self.encode_prompt(p) for p in prompts]
        stops = [self._stop_ids(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            began = time.perf_counter()
            gens = self._generate_batch([encoded[i] for i in chunk], max_new_tokens, stop, [stops[i] for i in chunk])
            per_row_ms = (time.perf_counter() - began) * 1000 / len(chunk)
            for i, g in zip(chunk, gens):
                g.latency_ms = per_row_ms
                results[i] = g
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], max_new_tokens: int, stop: list[str],
                        eos: list[set[int]]) -> list[Generation]:
        """Greedy completions of several prompts at once: one sequence each in a llama.cpp
        context with a KV cache shared by all, every step one decode of one token per active
        sequence; a finished sequence is dropped from the cache."""
        need = max(len(b) for b in batch) + max_new_tokens
        if self._batched is None or not self._batched.fits(len(batch), need):
            if self._batched is not None:
                self._batched.close()
            self._batched = _BatchedContext(self.llm, self.batch_size, need, sum(len(b) for b in batch),
                                            self.n_threads)
        ctx = self._batched
        n = len(batch)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        entropies: list[list[float]] = [[] for _ in range(n)]
        texts: list[str | None] = [None] * n
        ctx.clear()
        logits = ctx.prefill(batch)
        active = list(range(n))
        positions = [len(b) for b in batch]
        for _ in range(max_new_tokens):
            next_tokens = []
            for row, row_logits in zip(active, logits):
                logp = _log_softmax(row_logits)
                tok = int(logp.argmax())
                tokens[row].append(tok)
                logprobs[row].append(float(logp[tok]))
                entropies[row].append(float(-(np.exp(logp) * logp).sum()))
                texts[row] = finished_text(tokens[row], stop, eos[row], self.decode)
                next_tokens.append(tok)
            still = [(row, tok) for row, tok in zip(active, next_tokens) if texts[row] is None]
            for row in active:
                if texts[row] is not None:
                    ctx.drop(row)
            if not still or len(tokens[still[0][0]]) >= max_new_tokens:
                break
            active = [row for row, _ in still]
            logits = ctx.step([(row, tok, positions[row]) for row, tok in still])
            for row in active:
                positions[row] += 1
        return [Generation(text=texts[r] if texts[r] is not None else self.decode(tokens[r]),
                           prompt_tokens=len(batch[r]), output_tokens=len(tokens[r]), token_logprobs=logprobs[r],
                           token_entropies=entropies[r]) for r in range(n)]

    def _generate_one(self, prompt: str, max_new_tokens: int, stop: list[str]) -> Generation:
        began = time.perf_counter()
        ids = self.encode_prompt(prompt)
        eos = self._stop_ids(prompt)
        seq = self._sequence(len(ids) + max_new_tokens)
        logits = seq.start(ids)
        tokens: list[int] = []
        logprobs: list[float] = []
        entropies: list[float] = []
        text = None
        for _ in range(max_new_tokens):
            logp = _log_softmax(logits)
            tok = int(logp.argmax())
            tokens.append(tok)
            logprobs.append(float(logp[tok]))
            entropies.append(float(-(np.exp(logp) * logp).sum()))
            # llama.cpp's own generate() does not stop at EOS; this loop does.
            text = finished_text(tokens, stop, eos, self.decode)
            if text is not None:
                break
            if len(tokens) < max_new_tokens:
                logits = seq.append(tok)
        if text is None:
            text = self.decode(tokens)
        return Generation(text=text, prompt_tokens=len(ids), output_tokens=len(tokens), token_logprobs=logprobs,
                          token_entropies=entropies, latency_ms=(time.perf_counter() - began) * 1000)

    def _sequence(self, n_tokens: int) -> _PrefixSequence:
        """The one-prompt-at-a-time context, with room for `n_tokens` (grown as `_ensure_ctx`
        grows the main one; a new context starts with an empty cache)."""
        if self._single is None or n_tokens > self._single.ctx.seq_len:
            room = max(n_tokens, 2 * self._single.ctx.seq_len if self._single else 512)
            if self.n_ctx_train:
                room = max(n_tokens, min(room, self.n_ctx_train))
            if self._single is not None:
                self._single.close()
            self._single = _PrefixSequence(_BatchedContext(self.llm, 1, room, min(room, 512), self.n_threads))
        return self._single

    def sample(self, prompts: list[str], *, max_new_tokens: int, stop: list[str],
               sampling: Sampling) -> list[list[Generation]]:
        """Draws from the tempered, top-k/top-p filtered distribution of llama.cpp's logits, with
        numpy's generator seeded once per call; the prompt is evaluated once per prompt and each
        draw continues from it (the KV cache past the prompt is discarded between draws)."""
        rng = np.random.default_rng(sampling.seed)
        out = []
        for prompt in prompts:
            ids = self.encode_prompt(prompt)
            self._ensure_ctx(len(ids) + max_new_tokens)
            self.llm.reset()
            self.llm.eval(ids)
            first = np.array(self.llm.scores[len(ids) - 1], dtype=np.float64)
            draws = []
            for _ in range(sampling.n):
                began = time.perf_counter()
                self.llm.n_tokens = len(ids)  # rewind to the end of the prompt
                draws.append(self._draw(ids, first, max_new_tokens, stop, sampling, rng, began, self._stop_ids(prompt)))
            out.append(draws)
        return out

    def _draw(self, ids: list[int], first: np.ndarray, max_new_tokens: int, stop: list[str], sampling: Sampling,
              rng: np.random.Generator, began: float, eos: set[int]) -> Generation:
        tokens: list[int] = []
        text = None
        logits = first
        for _ in range(max_new_tokens):
            tok = sample_token(logits, sampling, rng)
            tokens.append(tok)
            text = finished_text(tokens, stop, eos, self.decode)
            if text is not None:
                break
            if len(tokens) < max_new_tokens:
                self.llm.eval([tok])
                logits = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)
        return Generation(text=self.decode(tokens) if text is None else text, prompt_tokens=len(ids),
                          output_tokens=len(tokens), latency_ms=(time.perf_counter() - began) * 1000)

    # -- scoring -----------------------------------------------------------------------------
    def loglikelihoods(self, contexts: list[str], continuations: list[str]) -> list[float]:
        """Sum of log p(continuation | context), tokenized as the transformers backend does."""
        scores = []
        for context, continuation in zip(contexts, continuations):
            ctx, cont = self._split_pair(context, continuation)
            inputs = (ctx + cont)[:-1]
            logp = _log_softmax(self.logits(inputs)[len(inputs) - len(cont) :])
            scores.append(float(logp[np.arange(len(cont)), cont].sum()))
        return scores

    def _split_pair(self, context: str | list[dict], continuation: str) -> tuple[list[int], list[int]]:
        bos = None if self.chat.wants_template(context) else self.bos
        return split_pair(self.encode, self.prompt_text(context), continuation, bos=bos, start_token=self._prefix_token,
                          max_len=self.n_ctx_train)

    def _prefix_token(self) -> int:
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        if bos >= 0:
            return bos
        if eos >= 0:
            return eos
        raise BadInput(f"{self.name}: the vocabulary has neither BOS nor EOS to start a document")

    def perplexity(self, texts: list[str], *, max_length: int, rule: str) -> PerplexityResult:
        """Same windows and definitions as orstack.backends.perplexity, scored by llama.cpp."""
        from orstack.backends.perplexity import PerplexityResult, _scored_targets, windows_of
        from orstack.console import track

        windows, n_bytes = windows_of(texts, self.encode, self.decode, self._prefix_token(), max_length, rule)
        nll = 0.0
        for w in track(windows, "ppl (llama.cpp)", unit="windows"):
            logits = self.logits(w.input_ids)
            n_in = len(w.input_ids)
            logp = _log_softmax(logits[n_in - w.n_scored : n_in])
            nll -= float(logp[np.arange(w.n_scored), _scored_targets(w)].sum())
        return PerplexityResult(nll, sum(w.n_scored for w in windows), n_bytes, rule)

    # -- speed -------------------------------------------------------------------------------
    def speed_sample(self, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
        """Seconds for one prefill of `prompt_tokens` tokens and `new_tokens` greedy steps
        (EOS ignored), as HFBackend.speed_sample measures."""
        vocab = self.llm.n_vocab()
        ids = [i % vocab for i in range(prompt_tokens)]
        self._ensure_ctx(prompt_tokens + new_tokens)
        self.llm.reset()
        began = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([int(self.llm.scores[self.llm.n_tokens - 1].argmax())])
        return prefill, time.perf_counter() - began

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        for ctx in (self._batched, self._single):  # before the model they were made from
            if ctx is not None:
                ctx.close()
        self._batched = self._single = None
        if self.llm is not None:
            self.llm.close()
        self.llm = None


class _BatchedContext:
    """A second llama.cpp context on the backend's model for batched greedy decoding: `n_seq`
    sequences of up to `seq_len` tokens each in one unified F32 KV cache (as the main context's,
    so the logits are the same), logits kept only where asked."""

    def __init__(self, llm, n_seq: int, seq_len: int, prefill_tokens: int, n_threads: int) -> None:  # noqa: ANN001
        import llama_cpp

        self.lib = llama_cpp
        self.n_seq, self.seq_len = n_seq, seq_len
        self.n_vocab = llm.n_vocab()
        # the main context's settings (F32 cache, no flash attention, rope, threads), room for n_seq
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx = n_seq * seq_len
        self.n_batch = max(prefill_tokens, n_seq, 512)
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a batched context")
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def fits(self, n_seq: int, seq_len: int) -> bool:
        return n_seq <= self.n_seq and seq_len <= self.seq_len

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    def drop(self, seq: int, start: int = -1) -> None:
        """Forget sequence `seq`'s cache from position `start` on (all of it by default)."""
        self.lib.llama_memory_seq_rm(self.memory, seq, start, -1)

    def prefill(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """Evaluate every prompt (sequence i = prompts[i]); the logits after each one's last token.
        The prompts' common prefix (a chat template's head) is evaluated once, in sequence 0, and
        its cache copied to the others, as llama.cpp's parallel example shares a system prompt;
        each sequence then evaluates only its own suffix (at least its last token)."""
        shared = min(min(len(p) for p in prompts) - 1, *(common_prefix_length(prompts[0], p) for p in prompts))
        if len(prompts) > 1 and shared > 0:
            self.decode_all([(0, tok, pos, False) for pos, tok in enumerate(prompts[0][:shared])])
            for seq in range(1, len(prompts)):
                self.lib.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)
        else:
            shared = 0
        return self.decode_all([(seq, p[pos], pos, pos == len(p) - 1)
                                 for seq, p in enumerate(prompts) for pos in range(shared, len(p))])

    def decode_all(self, items: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """`_decode` in batches of at most n_batch tokens."""
        rows: list[np.ndarray] = []
        for start in range(0, len(items), self.n_batch):
            rows.extend(self._decode(items[start : start + self.n_batch]))
        return rows

    def step(self, items: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """One token per (sequence, token, position); the logits after each."""
        return self._decode([(seq, tok, pos, True) for seq, tok, pos in items])

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        b = self.batch
        for i, (seq, tok, pos, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        status = self.lib.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status})")
        out = []
        for i, (*_, want) in enumerate(items):
            if want:
                ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return out

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None


class _PrefixSequence:
    """One sequence in its own context that keeps its KV cache from prompt to prompt: a new
    prompt is evaluated from the first token where it differs from what the cache holds.
    Prompts through a chat template share its head (SmolLM2: 30 of ~45 tokens), which prefill
    then pays once. Each position's keys and values are the same computation either way, and
    only the last prompt token's logits are computed (the output matrix is a fifth of a small
    model); on 200 SmolLM2 Q8_0 chat tasks the greedy answers were those of a fresh cache."""

    def __init__(self, ctx: _BatchedContext) -> None:
        self.ctx = ctx
        self.tokens: list[int] = []  # what the cache holds, position by position

    def start(self, ids: list[int]) -> np.ndarray:
        """Logits after the prompt `ids`, evaluating only what the cache does not hold (at
        least its last token, whose logits are wanted)."""
        keep = min(common_prefix_length(self.tokens, ids), len(ids) - 1)
        self.ctx.drop(0, keep)
        self.tokens = ids[:keep]
        rows = self.ctx.decode_all([(0, ids[pos], pos, pos == len(ids) - 1) for pos in range(keep, len(ids))])
        self.tokens = list(ids)
        return rows[-1]

    def append(self, token: int) -> np.ndarray:
        """Logits after one more token."""
        logits = self.ctx.step([(0, token, len(self.tokens))])[0]
        self.tokens.append(token)
        return logits

    def close(self) -> None:
        self.ctx.close()

