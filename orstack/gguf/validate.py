"""Does the GGUF file behave like the model it came from? Checked in llama.cpp.

Two measures, on held-out prompts and text:
- greedy-token agreement: the source model continues each prompt greedily for `n_tokens`
  tokens (EOS ignored, so every prompt contributes the same count); llama.cpp reads the
  same prompt + continuation and we count the positions where its argmax is the source's
  token (teacher-forced, so one early flip does not hide the rest).
- perplexity of both on the same text, same windows (lm-eval rolling rule).
Both sides go through orstack/backends: the transformers backend over the loaded source
model (HFBackend.from_model) and the llama.cpp backend over the file.
Gates (issue 3): f32/f16 agreement >= 99%, q8_0 (and bf16) >= 95%, and perplexity within
2% for all of these; lower-bit types are reported, not gated.
"""

from __future__ import annotations

from dataclasses import dataclass

GATES = {"f32": 0.99, "f16": 0.99, "bf16": 0.95, "q8_0": 0.95}  # minimum greedy agreement
PPL_TOLERANCE = 0.02
PPL_BATCH = 8  # perplexity windows per forward pass on the source

DEFAULT_PROMPTS = (
    "The history of the printing press begins",
    "12+345=",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "rev abcdef=",
    "The three primary colours are",
)
DEFAULT_TEXT = (
    "Printing spread quickly across Europe in the second half of the fifteenth century. Within fifty years "
    "presses were running in more than two hundred cities, and the price of a book fell so far that a "
    "student could own several. Scholars argued about what the change meant: some praised the new abundance "
    "of texts, others worried that careless printers multiplied errors faster than any scribe had. "
    "What nobody disputed was the speed. A single press could produce in a week what a copying workshop "
    "needed a year to finish, and the habit of reading silently, alone, began to replace reading aloud.\n"
    "7+8=15\n23+19=42\n104-37=67\nrev stone=enots\nsort dcba=abcd\ncopy kite=kite\n"
    "A river forms where rain falls faster than the ground can absorb it. Small channels join into streams, "
    "streams into rivers, and the river carries sand and silt towards the sea, building deltas and plains.\n"
)


@dataclass
class Validation:
    qtype: str
    agreement: float  # fraction of greedy tokens llama.cpp reproduces
    n_compared: int
    ppl_source: float
    ppl_gguf: float
    min_agreement: float | None  # None: not gated

    @property
    def ppl_change(self) -> float:
        return self.ppl_gguf / self.ppl_source - 1

    @property
    def gated(self) -> bool:
        return self.min_agreement is not None

    @property
    def passed(self) -> bool:
        if not self.gated:
            return True
        return self.agreement >= self.min_agreement and abs(self.ppl_change) <= PPL_TOLERANCE

    def as_dict(self) -> dict:
        return {"type": self.qtype, "agreement": self.agreement, "tokens_compared": self.n_compared,
                "ppl_source": self.ppl_source, "ppl_gguf": self.ppl_gguf, "ppl_change": self.ppl_change,
                "gated": self.gated, "passed": self.passed}


@dataclass
class Reference:
    """What the source model does on the held-out prompts and text (independent of --type)."""

    prompt_ids: list[list[int]]
    continuations: list[list[int]]
    ppl: float
    texts: list[str]
    max_length: int


def source_reference(model, tokenizer, *, prompts: list[str] | None = None, texts: list[str] | None = None,
                     n_tokens: int = 100, max_length: int = 512) -> Reference:
    """Greedy continuations and perplexity of the source model (through the transformers
    backend), computed once per model."""
    from orstack.backends.hf import HFBackend

    source = HFBackend.from_model(model, tokenizer, name="source", batch_size=PPL_BATCH)
    prompts = list(prompts or DEFAULT_PROMPTS)
    texts = list(texts or [DEFAULT_TEXT])
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length) or max_length)
    n_tokens = max(1, min(n_tokens, max_length // 2))
    prompt_ids, continuations = [], []
    for prompt in prompts:
        ids = source.encode_prompt(prompt)[: max_length - n_tokens]
        prompt_ids.append(ids)
        continuations.append(source.greedy_tokens(ids, n_tokens))
    ppl = source.perplexity(texts, max_length=max_length, rule="rolling").ppl
    return Reference(prompt_ids, continuations, ppl, texts, max_length)


def validate(model, tokenizer, gguf_path, qtype: str, *, prompts: list[str] | None = None,
             texts: list[str] | None = None, n_tokens: int = 100, max_length: int = 512,
             reference: Reference | None = None, threads: int | None = None) -> Validation:
    """Compare the GGUF file at `gguf_path` (in llama.cpp, through the llama.cpp backend) with
    the loaded source model."""
    from orstack.backends.llamacpp import LlamaCppBackend

    ref = reference or source_reference(model, tokenizer, prompts=prompts, texts=texts, n_tokens=n_tokens,
                                        max_length=max_length)
    backend = LlamaCppBackend(str(gguf_path), n_ctx=ref.max_length, n_threads=threads)
    try:
        matches = total = 0
        for ids, cont in zip(ref.prompt_ids, ref.continuations):
            logits = backend.logits(ids + cont[:-1])
            predicted = logits[len(ids) - 1 :].argmax(axis=-1)
            matches += int((predicted == cont).sum())
            total += len(cont)
        ppl_gguf = backend.perplexity(ref.texts, max_length=ref.max_length, rule="rolling").ppl
    finally:
        backend.close()
    return Validation(qtype, matches / max(total, 1), total, ref.ppl, ppl_gguf, GATES.get(qtype))


def llama_cpp_quantize(source_gguf, out, qtype: str, threads: int = 1) -> str:
    """Quantize an (f32) GGUF file with llama.cpp's own quantizer (the library behind llama-quantize)
    to the file type `qtype` declares, the reference our exporter is compared with; returns that
    file type's llama.cpp name (e.g. Q4_K_M)."""
    import ctypes

    import llama_cpp

    from orstack.gguf.export import TYPE_INFO, check_type

    name = TYPE_INFO[check_type(qtype)][1].removeprefix("MOSTLY_")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source_gguf).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source_gguf} to {name}")
    return name
