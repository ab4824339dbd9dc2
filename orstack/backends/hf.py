"""The transformers backend: batched greedy generation and log-likelihoods in float32.

Batching must not change results, so every batch carries an explicit attention mask and
position ids computed from it: left padding for generation (new tokens line up at the
right edge), right padding for scoring (causal attention never sees the padding).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from orstack.backends.base import Generation, PromptEncoding, Sampling, common_prefix_length, finished_text, split_pair

if TYPE_CHECKING:
    import torch

    from orstack.backends.perplexity import PerplexityResult


class HFBackend(PromptEncoding):
    """A causal LM loaded through orstack.io.checkpoint.load_model (every orstack format)."""

    def __init__(self, spec: str, *, device: str = "cpu", batch_size: int = 16, dtype: str = "float32",
                 trust_pickle: bool = False, chat_template: str | None = None) -> None:
        from orstack.io.checkpoint import load_model

        started = time.perf_counter()
        model, tokenizer = load_model(spec, device=device, dtype=dtype, trust_pickle=trust_pickle)
        self._attach(str(spec), model, tokenizer, batch_size, chat_template)
        self.load_seconds = time.perf_counter() - started

    @classmethod
    def from_model(cls, model, tokenizer, *, name: str = "<in memory>", batch_size: int = 16,  # noqa: ANN001
                   chat_template: str | None = None) -> HFBackend:
        """A backend over a model already in memory (a stage's model before it is saved)."""
        backend = cls.__new__(cls)
        backend._attach(name, model, tokenizer, batch_size, chat_template)
        backend.load_seconds = 0.0
        return backend

    def _attach(self, name: str, model, tokenizer, batch_size: int, chat_template: str | None) -> None:  # noqa: ANN001
        self.name = name
        self.batch_size = batch_size
        self.model, self.tokenizer = model, tokenizer
        self.device = next(self.model.parameters()).device
        tok = self.tokenizer
        self.pad_id = next(t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None)
        self.eos_ids = _eos_ids(self.model, tok)
        self.bos = tok.bos_token_id if _tokenizer_adds_bos(tok) else None
        self.chat = _templating(name, tok, chat_template)
        self.share_prefix = True  # False: every row prefilled whole (the reference path, for tests)
        self._prefix_ids: list[int] | None = None
        self._prefix_kv: list = []

    # -- tokenization ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # -- generation --------------------------------------------------------------------------
    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str]) -> list[Generation]:
        encoded = [self.encode_prompt(p) for p in prompts]
        stops = [self._stop_ids(p) for p in prompts]
        # Similar lengths in a batch mean little padding; results do not depend on the grouping.
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
        import torch

        n = len(batch)
        shared, cache = self._prefix_cache(batch)
        ids, mask = self._left_pad([b[shared:] for b in batch])
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([mask.new_ones((n, shared)), mask], dim=-1)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        entropies: list[list[float]] = [[] for _ in range(n)]
        texts: list[str | None] = [None] * n  # set when a row stops
        active = list(range(n))  # batch position -> original row, for rows still generating
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            if n == 1 and not shared:
                self._remember_prefix(batch[0][:-1], cache)
            for _ in range(max_new_tokens):
                logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
                next_ids = logp.argmax(dim=-1)
                chosen = logp.gather(-1, next_ids[:, None])[:, 0].tolist()
                entropy = (-(logp.exp() * logp).sum(-1)).tolist()
                for pos, tok in enumerate(next_ids.tolist()):
                    row = active[pos]
                    tokens[row].append(tok)
                    logprobs[row].append(chosen[pos])
                    entropies[row].append(entropy[pos])
                    texts[row] = self._finished_text(tokens[row], stop, eos[row])
                keep = [pos for pos, row in enumerate(active) if texts[row] is None]
                if not keep or len(tokens[active[keep[0]]]) >= max_new_tokens:
                    break  # every row stopped, or the budget is spent (no forward pass for a token never read)
                if len(keep) < len(active):  # drop finished rows so they cost nothing more
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, positions, next_ids = mask[index], positions[index], next_ids[index]
                    active = [active[pos] for pos in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True)
        return [
            Generation(
                text=texts[row] if texts[row] is not None else self._decode(tokens[row]),
                prompt_tokens=len(batch[row]),
                output_tokens=len(tokens[row]),
                token_logprobs=logprobs[row],
                token_entropies=entropies[row],
            )
            for row in range(n)
        ]

    # -- the shared-prefix cache -------------------------------------------------------------
    # Prompts through a chat template share its head (SmolLM2: 30 of ~45 tokens are the default
    # system prompt), and prefill, not decoding, is most of a short answer's cost. The keys and
    # values of a prefix are computed once and copied to every row that starts with it; each row
    # then prefills only its own suffix. Causal attention makes the result the same computation
    # (the prefix never sees what follows it), rounded differently only as a batch already is.
    def _prefix_cache(self, batch: list[list[int]]):  # noqa: ANN202 - (tokens shared, DynamicCache)
        """(tokens of every row already in the returned cache, the cache for this batch)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        if not self.share_prefix:
            return 0, cache
        room = min(len(b) for b in batch) - 1  # each row keeps a token of its own, for its logits
        shared = min(common_prefix_length(self._prefix_ids, b) for b in batch) if self._prefix_ids else 0
        if len(batch) > 1:
            common = min(min(common_prefix_length(batch[0], b) for b in batch[1:]), room)
            # a new prefix (one forward pass for the whole batch) when the kept one covers much less
            if common >= MIN_SHARED_PREFIX and common >= shared + MIN_SHARED_PREFIX:
                prefix = batch[0][:common]
                probe = DynamicCache()
                with torch.inference_mode():
                    self.model(input_ids=torch.tensor([prefix], device=self.device), past_key_values=probe,
                               use_cache=True, logits_to_keep=1)
                self._remember_prefix(prefix, probe)
                shared = len(prefix) if self._prefix_ids else 0
        shared = min(shared, room)
        if shared < MIN_SHARED_PREFIX:
            return 0, cache
        for i, (keys, values) in enumerate(self._prefix_kv):
            cache.update(keys[:, :, :shared].expand(len(batch), -1, -1, -1).contiguous(),
                         values[:, :, :shared].expand(len(batch), -1, -1, -1).contiguous(), i)
        return shared, cache

    def _remember_prefix(self, prefix: list[int], cache) -> None:  # noqa: ANN001 - a filled DynamicCache
        """Keep the keys and values of `prefix` (the first len(prefix) positions of a one-row cache)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", [])
        if len(layers) != self.model.config.get_text_config().num_hidden_layers or \
                any(type(layer) is not DynamicLayer for layer in layers):
            self.share_prefix = False  # sliding windows, recurrent state: not a plain prefix to copy
            self._prefix_ids, self._prefix_kv = None, []
            return
        if len(prefix) < MIN_SHARED_PREFIX:
            return
        self._prefix_ids = list(prefix)
        self._prefix_kv = [(layer.keys[:, :, : len(prefix)].clone(), layer.values[:, :, : len(prefix)].clone())
                           for layer in layers]

    def sample(self, prompts: list[str], *, max_new_tokens: int, stop: list[str],
               sampling: Sampling) -> list[list[Generation]]:
        """transformers' own sampler (multinomial over the tempered, top-k/top-p filtered
        distribution), one prompt at a time, seeded once per call."""
        import torch

        torch.manual_seed(sampling.seed)
        out = []
        for prompt in prompts:
            began = time.perf_counter()
            ids = torch.tensor([self.encode_prompt(prompt)], device=self.device)
            eos = self._stop_ids(prompt)
            # the template's end-of-turn token stops generation too (only when the prompt used the template)
            extra = {"eos_token_id": sorted(eos)} if eos != self.eos_ids else {}
            with torch.inference_mode():
                seqs = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                           temperature=sampling.temperature, top_k=sampling.top_k,
                                           top_p=sampling.top_p, num_return_sequences=sampling.n,
                                           max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, **extra)
            per_draw_ms = (time.perf_counter() - began) * 1000 / sampling.n
            draws = []
            for seq in seqs.tolist():
                new = seq[ids.shape[1]:]
                ended = next((i for i, t in enumerate(new) if t in eos), None)
                new = new if ended is None else new[: ended + 1]
                text = self._finished_text(new, stop, eos) if new else ""
                draws.append(Generation(text=text if text is not None else self._decode(new),
                                        prompt_tokens=ids.shape[1], output_tokens=len(new), latency_ms=per_draw_ms))
            out.append(draws)
        return out

    def logits(self, token_ids: list[int]):  # noqa: ANN201 - numpy array
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([token_ids], device=self.device))
        return out.logits[0].float().cpu().numpy()

    def greedy_tokens(self, token_ids: list[int], n_tokens: int) -> list[int]:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        out_ids: list[int] = []
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([token_ids], device=self.device), past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            for _ in range(n_tokens):
                tok = int(out.logits[0, -1].argmax())
                out_ids.append(tok)
                out = self.model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=cache,
                                 use_cache=True)
        return out_ids

    def _finished_text(self, tokens: list[int], stop: list[str], eos: set[int] | None = None) -> str | None:
        """The final text when this row has stopped (EOS or a stop sequence), else None."""
        return finished_text(tokens, stop, self.eos_ids if eos is None else eos, self._decode)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _left_pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- scoring -----------------------------------------------------------------------------
    def loglikelihoods(self, contexts: list[str], continuations: list[str]) -> list[float]:
        """Sum of log p(continuation | context) per pair, tokenized as lm-evaluation-harness does:
        the pair is encoded whole and the context's tokens are split off, so a continuation
        that merges with the end of the context is scored on the tokens the model would see."""
        pairs = [self._split_pair(c, x) for c, x in zip(contexts, continuations)]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores = [0.0] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, s in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                scores[i] = s
        return scores

    def _split_pair(self, context: str | list[dict], continuation: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        templated = self.chat.wants_template(context)
        return split_pair(self.encode, self.prompt_text(context), continuation, bos=None if templated else self.bos,
                          start_token=lambda: tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                          max_len=self.context_length())

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        import torch

        inputs = [(ctx + cont)[:-1] for ctx, cont in pairs]
        width = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        positions = torch.arange(width).expand(len(inputs), width)
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device)).logits
        scores = []
        for row, (_ctx, cont) in enumerate(pairs):
            n_in = len(inputs[row])
            rows = logits[row, n_in - len(cont) : n_in].double()
            logp = torch.log_softmax(rows, dim=-1)
            scores.append(logp.gather(-1, torch.tensor(cont, device=logp.device)[:, None]).sum().item())
        return scores

    def perplexity(self, texts: list[str], *, max_length: int, rule: str) -> PerplexityResult:
        from orstack.backends.perplexity import perplexity

        return perplexity(self.model, self.tokenizer, texts, max_length=max_length, rule=rule,
                          batch_size=self.batch_size)

    # -- speed -------------------------------------------------------------------------------
    def speed_sample(self, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
        """Seconds for one prefill of `prompt_tokens` tokens and for `new_tokens` greedy decode
        steps after it (EOS ignored, so every run decodes the same number of tokens)."""
        import torch
        from transformers import DynamicCache

        vocab = self.model.config.vocab_size
        ids = torch.arange(prompt_tokens, device=self.device)[None, :] % vocab
        cache = DynamicCache()
        with torch.inference_mode():
            began = time.perf_counter()
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - began
            began = time.perf_counter()
            for _ in range(new_tokens):
                next_id = out.logits[:, -1, :].argmax(-1, keepdim=True)
                out = self.model(input_ids=next_id, past_key_values=cache, use_cache=True)
            decode = time.perf_counter() - began
        return prefill, decode

    def size_bytes(self) -> int:
        return disk_size(Path(self.name))

    def close(self) -> None:
        import gc

        self.model = None
        gc.collect()


MIN_SHARED_PREFIX = 8  # shorter common heads are not worth a separate forward pass


def disk_size(path: Path) -> int:
    """Bytes on disk of a checkpoint file or directory (0 for a hub id not stored locally)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return 0


def _tokenizer_adds_bos(tok) -> bool:  # noqa: ANN001 - any transformers tokenizer
    if tok.bos_token_id is None:
        return False
    return tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]


def _eos_ids(model, tok) -> set[int]:  # noqa: ANN001
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tok):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids



def _templating(name: str, tok, choice: str | None):  # noqa: ANN001, ANN202 - a tokenizer; ChatTemplating
    """The run's chat-template choice resolved against this tokenizer: transformers renders it
    (apply_chat_template), and the end-of-turn token is found from the template."""
    from orstack.backends.chat import ChatTemplating, end_of_turn_token

    own = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    special = {k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)}

    def renderer(template: str, messages: list[dict]) -> str:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)

    chat = ChatTemplating(choice, own, special, name, renderer)
    if chat.template is not None:
        specials = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        chat.end_of_turn = end_of_turn_token(chat.template, special,
                                             lambda t: tok(t, add_special_tokens=False)["input_ids"],
                                             lambda i: i in specials)
    return chat
