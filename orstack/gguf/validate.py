"""Does the GGUF file behave like the model it came from? Checked in llama.cpp.

Three measures, on held-out prompts and text:
- greedy-token agreement: the source model continues each prompt greedily for `n_tokens`
  tokens (EOS ignored, so every prompt contributes the same count); llama.cpp reads the
  same prompt + continuation and we count the positions where its argmax is the source's
  token (teacher-forced, so one early flip does not hide the rest).
- logits: on those same sequences, the largest and the mean absolute difference between the
  two runtimes' logits, and the largest source logit (the scale). Greedy agreement alone misses
  bugs that keep the argmax (a Gemma 2 file without its softcaps agrees on every argmax while
  its logits are off by 5-12); the logits do not.
- perplexity of both on the same text, same windows (lm-eval rolling rule).
Both sides go through orstack/backends: the transformers backend over the loaded source
model (HFBackend.from_model) and the llama.cpp backend over the file.
Gates (every type has one; README "Gates"): f32/f16 agreement >= 99%, q8_0 and bf16 >= 95%
(issue 3), the 5- and 6-bit K-quants >= 95% (the seed's Q5_K_M gate), all of these with
perplexity within 2%; the 4-bit types >= 90% and within 5% (llama.cpp's own tables put 4-bit
files 1-4% above F16 in perplexity on 7B models, and flip more near-tied tokens); --min-agreement
and --max-ppl-change override them. F32 files must also keep every
logit within LOGIT_TOLERANCE x the source's largest |logit|: llama.cpp computes GELU through an
fp16 lookup table, so exact GELU families (Gemma, Phi-2, GPT-2) differ by ~3e-4 of the scale
where SiLU families differ by ~3e-6; every export bug measured (a missing softcap, window, norm
offset, rotary permutation) moves logits by more than half the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

GATES = {"f32": 0.99, "f16": 0.99, "bf16": 0.95, "q8_0": 0.95, "q6_k": 0.95, "q5_k": 0.95, "q5_k_m": 0.95,
         "q4_k_m": 0.90, "q4_k": 0.90, "q4_1": 0.90, "q4_0": 0.90}  # minimum greedy agreement
PPL_TOLERANCE = 0.02  # largest |perplexity change|, types of 5 bits and more
PPL_TOLERANCE_4BIT = 0.05
PPL_GATES = {t: PPL_TOLERANCE_4BIT if t.startswith("q4") else PPL_TOLERANCE for t in GATES}
LOGIT_TOLERANCE = 1e-2  # f32: max |logit difference| <= this x max |source logit|
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
    max_logit_diff: float = 0.0  # max |logits(gguf) - logits(source)| over the compared sequences
    mean_logit_diff: float = 0.0
    logit_scale: float = 1.0  # max |source logit|
    logit_tolerance: float | None = None  # relative to logit_scale; None: not gated
    ppl_tolerance: float = PPL_TOLERANCE  # largest |ppl_change|

    @property
    def logits_ok(self) -> bool:
        return self.logit_tolerance is None or self.max_logit_diff <= self.logit_tolerance * self.logit_scale

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
        return (self.agreement >= self.min_agreement and abs(self.ppl_change) <= self.ppl_tolerance
                and self.logits_ok)

    def as_dict(self) -> dict:
        return {"type": self.qtype, "agreement": self.agreement, "tokens_compared": self.n_compared,
                "ppl_source": self.ppl_source, "ppl_gguf": self.ppl_gguf, "ppl_change": self.ppl_change,
                "max_logit_diff": self.max_logit_diff, "mean_logit_diff": self.mean_logit_diff,
                "logit_scale": self.logit_scale, "logit_tolerance": self.logit_tolerance,
                "ppl_tolerance": self.ppl_tolerance, "gated": self.gated, "passed": self.passed}

    def checks(self, *, agreement_option: str = "--min-agreement",
               ppl_option: str = "--max-ppl-change") -> list:  # list[orstack.gates.Check]
        """The validation as quality-gate checks (orstack/gates.py)."""
        from orstack.gates import Gate

        if not self.gated:
            return []
        checks = [Gate("agreement", self.min_agreement, "min", agreement_option, "%").check(self.agreement),
                  Gate("ppl_change", self.ppl_tolerance, "max", ppl_option, "%").check(
                      abs(self.ppl_change), before=self.ppl_source, after=self.ppl_gguf)]
        if self.logit_tolerance is not None:
            checks.append(Gate("max_logit_diff / logit_scale", self.logit_tolerance, "max", "f32 logit rule").check(
                self.max_logit_diff / max(self.logit_scale, 1e-30)))
        return checks


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
             reference: Reference | None = None, threads: int | None = None, min_agreement: float | None = None,
             max_ppl_change: float | None = None) -> Validation:
    """Compare the GGUF file at `gguf_path` (in llama.cpp, through the llama.cpp backend) with
    the loaded source model."""
    import numpy as np

    from orstack.backends.hf import HFBackend
    from orstack.backends.llamacpp import LlamaCppBackend

    source = HFBackend.from_model(model, tokenizer, name="source", batch_size=PPL_BATCH)
    ref = reference or source_reference(model, tokenizer, prompts=prompts, texts=texts, n_tokens=n_tokens,
                                        max_length=max_length)
    backend = LlamaCppBackend(str(gguf_path), n_ctx=ref.max_length, n_threads=threads)
    try:
        matches = total = 0
        max_diff = diff_sum = scale = 0.0
        n_logits = 0
        for ids, cont in zip(ref.prompt_ids, ref.continuations):
            logits = backend.logits(ids + cont[:-1])
            predicted = logits[len(ids) - 1 :].argmax(axis=-1)
            matches += int((predicted == cont).sum())
            total += len(cont)
            expected = source.logits(ids + cont[:-1])
            diff = np.abs(np.asarray(logits, dtype=np.float64) - expected)
            max_diff = max(max_diff, float(diff.max()))
            diff_sum += float(diff.sum())
            n_logits += diff.size
            scale = max(scale, float(np.abs(expected).max()))
        ppl_gguf = backend.perplexity(ref.texts, max_length=ref.max_length, rule="rolling").ppl
    finally:
        backend.close()
    return Validation(qtype, matches / max(total, 1), total, ref.ppl, ppl_gguf,
                      GATES.get(qtype) if min_agreement is None else min_agreement,
                      max_logit_diff=max_diff, mean_logit_diff=diff_sum / max(n_logits, 1), logit_scale=scale,
                      logit_tolerance=LOGIT_TOLERANCE if qtype == "f32" else None,
                      ppl_tolerance=PPL_GATES.get(qtype, PPL_TOLERANCE) if max_ppl_change is None else max_ppl_change)


def llama_cpp_quantize(source_gguf, out, qtype: str, threads: int = 1, importance: dict | None = None,
                       pure: bool = False) -> str:
    """Quantize an (f32) GGUF file with llama.cpp's own quantizer (the library behind llama-quantize)
    to the file type `qtype` declares, the reference our exporter is compared with; returns that
    file type's llama.cpp name (e.g. Q4_K_M). `importance` (GGUF tensor name -> per-column
    importance, `importance_by_gguf_name`) is handed to it as llama-quantize --imatrix hands its
    file's contents; `pure` is llama-quantize --pure (one type for every 2-D weight, as orstack's
    non-mix types)."""
    import ctypes

    import llama_cpp
    import numpy as np

    from orstack.gguf.export import TYPE_INFO, check_type

    name = TYPE_INFO[check_type(qtype)][1].removeprefix("MOSTLY_")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = threads
    params.pure = pure
    keep = []  # the arrays and names must outlive the call
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (tensor, values) in enumerate(importance.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            key = tensor.encode()
            keep += [arr, key]
            entries[i].name = key
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(importance)].name = None  # the terminator
        params.imatrix = entries
        keep.append(entries)
    if llama_cpp.llama_model_quantize(str(source_gguf).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source_gguf} to {name}")
    return name
